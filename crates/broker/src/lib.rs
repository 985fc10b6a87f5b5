//! # courier-broker
//!
//! One node that hosts queues, topics, durable subscriptions and named
//! services, on every address it is told to listen on at once.
//!
//! - **Queues**: the courier-queue protocol over the queues under the data
//!   directory; every queue found there is opened (and recovered) at start.
//! - **Replicated queues** (cluster members only): a queue named by
//!   `[cluster] replicated_queues` lives in a Raft group of its own on
//!   `queue_replicas` members and is served through any member (see
//!   `replicated.rs`). What each fsync policy can lose: the `fsync` key
//!   is for the queues a broker keeps alone (`always`: nothing
//!   acknowledged; `interval`: what came in the last interval before a
//!   power loss; `never`: whatever the page cache held at a power loss,
//!   nothing at a crash of the process). A replicated queue's log is
//!   fdatasynced before every append counts, whatever `fsync` says, and an
//!   enqueue or ack is answered once a majority of its replicas has it: it
//!   is lost only if a majority loses its disk or power at once.
//! - **Pub/sub**: the courier-pubsub protocol on one bus, with durable
//!   subscriptions kept beside the queues.
//! - **Named services**: a service instance subscribes to its subject (say
//!   `svc.billing`) in a queue group named after the service; requests to the
//!   subject ([`courier_pubsub::remote::RemotePubSub::request`]) go to one
//!   instance each, in turn. An instance that dies loses its subscription
//!   with its connection, so requests fail over to the others.
//! - **Stats**: [`BrokerService::stats`] over RPC (what `courier stats`
//!   shows), and over HTTP ([`metrics`]): a live dashboard at `/`, JSON at
//!   `/api/stats`, Prometheus text at `/metrics`.
//! - **Browsers** (`ws://`, `wss://`): a `ws://HOST:PORT` or
//!   `wss://HOST:PORT` listen address starts a courier-web gateway there
//!   over the same bus, with the same `[auth]` tokens and permissions,
//!   durable subscriptions and counters, for the pages of
//!   `web_allowed_origins` (any, by default) ([`Broker::web_addresses`],
//!   [`BrokerStats::web_connections`]).
//!
//! [`Broker::shutdown`] stops accepting, lets calls in flight finish within
//! the grace period, then closes the queues (their logs flush and fsync).
//! A restart with the same data directory brings back every queue, durable
//! subscription and unacknowledged message.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use courier_broker::{Broker, BrokerConfig};
//!
//! let dir = std::env::temp_dir().join(format!("courier-broker-doc-{}", std::process::id()));
//! let mut config = BrokerConfig::default();
//! config.listen = vec!["tcp://127.0.0.1:0".into()];
//! config.data_dir = dir.clone();
//! config.metrics = String::new();
//! let broker = Broker::start(config).await?;
//! println!("serving on {}", broker.addresses()[0]);
//! let stats = broker.stats().await;
//! assert_eq!(stats.published, 0);
//! broker.shutdown().await;
//! # std::fs::remove_dir_all(&dir).ok();
//! # Ok(()) }
//! ```
//!
//! Dependencies beyond the workspace's usual ones: `toml` (the
//! configuration file; serde-based, no other parser in the tree).

#![warn(missing_docs)]

pub mod auth;
pub mod config;
pub mod metrics;
mod queues;
mod replicated;

pub use replicated::{ReplicaError, ReplicaQueue};

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use courier_pubsub::durable::{Durable, DurableError};
use courier_pubsub::remote::{HostCounters, PubSubHost, PubSubServiceServer};
use courier_pubsub::route::{RouteConfig, RouteServiceServer, Routes};
use courier_pubsub::Bus;
use courier_queue::core::QueueStats;
use courier_queue::remote::{QueueHost, QueueServiceServer, QueueSet};
use courier_queue::QueueError;
use courier_rpc::{Server, ServerConfig, ServerHandle};
use courier_transport::Address;

pub use config::{BrokerConfig, ConfigError, Fsync, WebListen};

/// Why a broker could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BrokerError {
    /// The configuration is unusable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A listen address could not be bound.
    #[error("cannot listen on {address}: {reason}")]
    Bind {
        /// The address.
        address: String,
        /// What went wrong.
        reason: String,
    },
    /// The data directory could not be opened (in use by another broker?).
    #[error("data directory: {0}")]
    Queue(#[from] QueueError),
    /// The durable subscriptions could not be restored.
    #[error("durable subscriptions: {0}")]
    Durable(#[from] DurableError),
    /// The cluster member could not start.
    #[error("cluster: {0}")]
    Cluster(#[from] courier_cluster::node::StartError),
}

/// How long [`Broker::shutdown`] waits for connections beyond the grace
/// period before it abandons them and closes the queues anyway.
pub const SHUTDOWN_MARGIN: Duration = Duration::from_secs(1);

/// One queue's counters.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QueueReport {
    /// The queue.
    pub name: String,
    /// Its counters.
    pub stats: QueueStats,
}

/// What a broker has done, as `courier stats` shows it.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BrokerStats {
    /// Since start, in milliseconds.
    pub uptime_ms: u64,
    /// Client connections open.
    pub connections: u64,
    /// Browser (WebSocket) connections open, counted apart from
    /// `connections`.
    pub web_connections: u64,
    /// Live subscriptions.
    pub subscriptions: u64,
    /// Messages published.
    pub published: u64,
    /// Live deliveries.
    pub delivered: u64,
    /// Messages dropped by slow-consumer policies.
    pub dropped: u64,
    /// Copies stored in durable subscriptions.
    pub stored: u64,
    /// Publish calls by host latency, per
    /// [`courier_pubsub::remote::LATENCY_BUCKETS_US`] bound, then the rest.
    pub publish_latency: Vec<u64>,
    /// Sum of publish latencies, in microseconds.
    pub publish_latency_sum_us: u64,
    /// Every open queue (dead-letter queues included), by name.
    pub queues: Vec<QueueReport>,
    /// Durable subscriptions, as (name, filter).
    pub durable: Vec<(String, String)>,
    /// This node's view of its cluster, if it is in one.
    pub cluster: Option<ClusterStats>,
}

/// A cluster member's counters.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ClusterStats {
    /// What `courier cluster status` shows, with this node's routes.
    pub status: courier_cluster::node::Status,
    /// Raft messages to peers that failed (unreachable, timed out, refused).
    pub raft_rpc_errors: u64,
    /// The replicated queues this node holds a replica of, as it sees
    /// each one's group.
    pub queues: Vec<ReplicatedQueueStatus>,
}

/// One replica of a replicated queue, as its node sees the queue's group.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ReplicatedQueueStatus {
    /// The queue.
    pub name: String,
    /// Its Raft group.
    pub group: u32,
    /// This node's role in it: `leader`, `follower`, `candidate`, …
    pub role: String,
    /// The leader this node knows of.
    pub leader: Option<u64>,
    /// The group's term.
    pub term: u64,
    /// The last entry applied here.
    pub applied_index: u64,
    /// The replicas; on the leader, each one's lag in entries.
    pub replicas: Vec<courier_cluster::node::Member>,
}

/// The broker's own protocol.
#[courier_rpc::service]
pub trait BrokerService {
    /// Counters of everything the broker hosts.
    async fn stats(&self) -> BrokerStats;
}

/// What the broker's parts share.
pub(crate) struct State {
    started: Instant,
    queues: QueueSet,
    bus: Bus,
    durable: Durable,
    counters: Arc<HostCounters>,
    server: Mutex<Option<ServerHandle>>,
    cluster: Option<Cluster>,
    /// The browser gateway, if any `ws://`/`wss://` address is served (one
    /// for all of them, so they share one connection count and limit).
    web: Option<courier_web::Gateway>,
}

/// The cluster member a broker hosts.
struct Cluster {
    node: Arc<courier_cluster::node::ClusterNode>,
    peers: courier_cluster::network::Peers,
    /// Pub/sub routes to every other member.
    routes: Arc<Routes>,
    /// Keeps `routes` to the membership.
    membership: tokio::task::JoinHandle<()>,
    /// The replicated queues (of `[cluster] replicated_queues`).
    replicated: Arc<replicated::Replicated>,
    /// Every group's Raft, for the peers' Raft traffic.
    raft_host: courier_cluster::network::RaftHost,
    /// Keeps the replicas held here to the declarations.
    declarations: tokio::task::JoinHandle<()>,
}

impl State {
    pub(crate) async fn stats(&self) -> BrokerStats {
        let connections = self
            .server
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map_or(0, |s| s.connections()) as u64;
        let mut queues = Vec::new();
        for queue in self.queues.opened().await {
            if let Some(dead) = queue.dead_letters() {
                queues.push(QueueReport {
                    name: dead.name().to_string(),
                    stats: dead.stats_now(),
                });
            }
            queues.push(QueueReport {
                name: queue.name().to_string(),
                stats: queue.stats_now(),
            });
        }
        if let Some(cluster) = &self.cluster {
            for (name, stats) in cluster.replicated.reports() {
                queues.push(QueueReport { name, stats });
            }
        }
        queues.sort_by(|a, b| a.name.cmp(&b.name));
        let c = &self.counters;
        BrokerStats {
            uptime_ms: self.started.elapsed().as_millis() as u64,
            connections,
            web_connections: self.web.as_ref().map_or(0, |w| w.connections()) as u64,
            subscriptions: self.bus.subscriptions() as u64,
            published: c.published.load(Ordering::Relaxed),
            delivered: c.delivered.load(Ordering::Relaxed),
            dropped: self.bus.dropped(),
            stored: c.stored.load(Ordering::Relaxed),
            publish_latency: c
                .latency
                .iter()
                .map(|b| b.load(Ordering::Relaxed))
                .collect(),
            publish_latency_sum_us: c.latency_sum_us.load(Ordering::Relaxed),
            queues,
            durable: self.durable.list(),
            cluster: self.cluster.as_ref().map(|c| ClusterStats {
                status: courier_cluster::node::Status {
                    routes: c.routes.stats(),
                    ..c.node.status()
                },
                raft_rpc_errors: c.peers.errors(),
                queues: c
                    .replicated
                    .statuses()
                    .into_iter()
                    .map(|(name, status)| ReplicatedQueueStatus {
                        name,
                        group: status.group,
                        role: status.role.to_string(),
                        leader: status.leader,
                        term: status.term,
                        applied_index: status.applied_index,
                        replicas: status.replicas,
                    })
                    .collect(),
            }),
        }
    }
}

struct StatsHost(Arc<State>);

impl BrokerService for StatsHost {
    async fn stats(&self) -> BrokerStats {
        self.0.stats().await
    }
}

/// A running broker.
pub struct Broker {
    state: Arc<State>,
    addresses: Vec<Address>,
    web: Vec<courier_web::WebServer>,
    web_addresses: Vec<String>,
    metrics: Option<metrics::Endpoint>,
    grace: Duration,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker")
            .field("addresses", &self.addresses)
            .field("web_addresses", &self.web_addresses)
            .field("data_dir", &self.state.queues.dir())
            .finish_non_exhaustive()
    }
}

impl Broker {
    /// Opens the data directory (recovering every queue and durable
    /// subscription in it), binds every listen address and the metrics
    /// endpoint, and starts serving.
    pub async fn start(config: BrokerConfig) -> Result<Broker, BrokerError> {
        let addresses = config.addresses()?;
        let web_listen = config.web_listen()?;
        let web_tls = config.web_tls()?;
        let metrics_address = config.metrics_address()?;
        let queues = QueueSet::new(&config.data_dir, config.queue_options());
        let recovered = queues.open_all().await?;
        let durable = Durable::open(queues.clone()).await?;
        let policy = Arc::new(auth::Policy::new(&config.auth)?);
        let bus = Bus::with_config(config.bus_config());
        let mut host = PubSubHost::with_durable(bus.clone(), durable.clone());
        let mut queue_host = QueueHost::serving(queues.clone());
        let mut queue_access: Option<Arc<dyn courier_queue::remote::QueueAccess>> = None;
        if !policy.is_open() {
            host = host.with_access(policy.clone());
            queue_host = queue_host.with_access(policy.clone());
            queue_access = Some(policy.clone());
        }
        let transport = config.transport()?;
        let mut listeners = Vec::new();
        for address in &addresses {
            listeners.push(bind(address, &transport).await?);
        }
        let mut web_listeners = Vec::new();
        for web in &web_listen {
            let listener = tokio::net::TcpListener::bind(&web.address)
                .await
                .map_err(|err| BrokerError::Bind {
                    address: format!("{}://{}", if web.tls { "wss" } else { "ws" }, web.address),
                    reason: err.to_string(),
                })?;
            web_listeners.push((listener, web.tls));
        }
        let cluster = match &config.cluster {
            Some(section) => {
                Some(start_cluster(&config, section, &transport, &mut listeners, &bus).await?)
            }
            None => None,
        };
        let web = (!web_listeners.is_empty()).then(|| {
            let mut gateway = courier_web::Gateway::new(bus.clone(), config.web_config())
                .with_authenticator(policy.clone(), config.auth.required)
                .with_counters(host.counters())
                .with_durable(durable.clone());
            if !policy.is_open() {
                gateway = gateway.with_access(policy.clone());
            }
            gateway
        });
        let mut web_servers = Vec::new();
        if let Some(gateway) = &web {
            for (listener, tls) in web_listeners {
                let tls = if tls { web_tls.clone() } else { None };
                let server = gateway
                    .serve(listener, tls)
                    .map_err(|err| BrokerError::Bind {
                        address: "a browser listen address".into(),
                        reason: err.to_string(),
                    })?;
                web_servers.push(server);
            }
        }
        let web_addresses: Vec<String> = web_servers.iter().map(|w| w.url()).collect();
        let state = Arc::new(State {
            started: Instant::now(),
            queues: queues.clone(),
            bus,
            durable: durable.clone(),
            counters: host.counters(),
            server: Mutex::new(None),
            cluster,
            web,
        });
        let metrics_limits = config.metrics_limits();
        let metrics = match metrics_address {
            Some(address) => Some(
                metrics::Endpoint::start(address, state.clone(), metrics_limits)
                    .await
                    .map_err(|err| BrokerError::Bind {
                        address: address.to_string(),
                        reason: err.to_string(),
                    })?,
            ),
            None => None,
        };
        let bound: Vec<Address> = listeners.iter().map(|l| l.local_addr().clone()).collect();
        let mut server_config = ServerConfig::default()
            .with_max_in_flight(config.max_in_flight)
            .with_max_streams(config.max_streams)
            .with_max_connections(config.max_connections, config.max_connections_per_identity)
            .with_authenticator(policy.clone(), config.auth.required);
        server_config.hello_timeout = Duration::from_millis(config.handshake_timeout_ms.max(1));
        if config.idle_timeout_ms > 0 {
            server_config =
                server_config.with_idle_timeout(Duration::from_millis(config.idle_timeout_ms));
        }
        if !policy.is_open() {
            let access = policy.clone();
            server_config = server_config
                .with_service_access(Arc::new(move |who, service| access.may_call(who, service)));
            let admins = policy.clone();
            server_config = server_config.with_reserved_connections(
                config.reserved_admin_connections,
                Arc::new(move |who| admins.is_admin(who)),
            );
        }
        let mut server = Server::new(server_config)
            .service(PubSubServiceServer::new(host))
            .service(QueueServiceServer::new(queues::BrokerQueues::new(
                queue_host,
                state.cluster.as_ref().map(|c| c.replicated.clone()),
                queue_access,
            )))
            .service(BrokerServiceServer::new(StatsHost(state.clone())));
        if let Some(cluster) = &state.cluster {
            let raft_host = cluster.raft_host.clone();
            let mut cluster_host = courier_cluster::service::ClusterHost::new(cluster.node.clone())
                .with_routes(cluster.routes.clone());
            if !policy.is_open() {
                cluster_host = cluster_host.with_access(policy.clone());
            }
            server = server
                .service(courier_cluster::network::RaftTransportServer::new(
                    raft_host,
                ))
                .service(courier_cluster::service::ClusterServiceServer::new(
                    cluster_host,
                ))
                .service(RouteServiceServer::new(cluster.routes.host()))
                .service(replicated::ReplicaQueueServer::new(
                    replicated::ReplicaHost(cluster.replicated.clone()),
                ));
        }
        // A broker for browsers only (every listen address ws:// or wss://)
        // serves no Courier protocol at all.
        if !listeners.is_empty() {
            let server = server.spawn_all(listeners);
            *state.server.lock().unwrap_or_else(|p| p.into_inner()) = Some(server);
        }
        tracing::info!(
            listen = ?bound.iter().map(ToString::to_string).collect::<Vec<_>>(),
            web = ?web_addresses,
            data_dir = %config.data_dir.display(),
            queues = recovered.len(),
            durable = durable.len(),
            metrics = ?metrics.as_ref().map(|m| m.address()),
            "broker started"
        );
        Ok(Broker {
            state,
            addresses: bound,
            web: web_servers,
            web_addresses,
            metrics,
            grace: Duration::from_millis(config.shutdown_grace_ms),
        })
    }

    /// The addresses it serves on (with ports chosen, if 0 was asked for).
    pub fn addresses(&self) -> &[Address] {
        &self.addresses
    }

    /// The browser gateway's addresses, as URLs (`ws://127.0.0.1:7880`,
    /// `wss://...`), with ports chosen if 0 was asked for. Apart from
    /// [`addresses`](Self::addresses): a transport [`Address`] has no
    /// WebSocket form.
    pub fn web_addresses(&self) -> &[String] {
        &self.web_addresses
    }

    /// The metrics endpoint's address, if it has one.
    pub fn metrics_address(&self) -> Option<std::net::SocketAddr> {
        self.metrics.as_ref().map(|m| m.address())
    }

    /// Its counters now.
    pub async fn stats(&self) -> BrokerStats {
        self.state.stats().await
    }

    /// The metrics, as the HTTP endpoint serves them.
    pub async fn metrics_text(&self) -> String {
        metrics::render(&self.state.stats().await)
    }

    /// Stops accepting, gives calls in flight the grace period, then closes
    /// every queue (flushing and fsyncing its log) before returning.
    ///
    /// The server's part is bounded by the grace period plus
    /// [`SHUTDOWN_MARGIN`], whatever the peers do: a client that stopped
    /// reading (frozen, or half-open behind a dead network) cannot keep the
    /// broker from closing its queues.
    pub async fn shutdown(self) {
        let server = self
            .state
            .server
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let bound = self.grace + SHUTDOWN_MARGIN;
        let grace = self.grace;
        let clients = async {
            if let Some(server) = server {
                if tokio::time::timeout(bound, server.shutdown(grace))
                    .await
                    .is_err()
                {
                    tracing::warn!(
                        ?bound,
                        "connections did not close within the grace period; abandoning them"
                    );
                }
            }
        };
        // Browsers get 1001 (going away) and the same grace, meanwhile;
        // each web server closes its own listener's connections.
        // Together, so several listeners take one grace period, not one each.
        let browsers = async {
            let mut stopping = tokio::task::JoinSet::new();
            for web in self.web {
                stopping.spawn(tokio::time::timeout(bound, web.shutdown(grace)));
            }
            while let Some(stopped) = stopping.join_next().await {
                if !matches!(stopped, Ok(Ok(()))) {
                    tracing::warn!(?bound, "a browser listener did not stop in time");
                }
            }
        };
        tokio::join!(clients, browsers);
        if let Some(metrics) = self.metrics {
            metrics.stop().await;
        }
        if let Some(cluster) = &self.state.cluster {
            cluster.membership.abort();
            cluster.declarations.abort();
            cluster.routes.close();
            cluster.replicated.shutdown().await;
            // Raft stops here; its log is closed (and synced) as it drops.
            if let Err(e) = cluster.node.raft().shutdown().await {
                tracing::warn!("raft shutdown: {e}");
            }
        }
        let state = self.state;
        // The last references to the queues go with the state; their logs
        // join their writers (flush and fsync) on drop.
        let queues = state.queues.clone();
        drop(state);
        queues.close_all().await;
        tracing::info!("broker stopped");
    }
}

async fn bind(
    address: &Address,
    transport: &courier_transport::TransportConfig,
) -> Result<courier_transport::Listener, BrokerError> {
    courier_transport::bind(address, transport)
        .await
        .map_err(|err| BrokerError::Bind {
            address: address.to_string(),
            reason: err.to_string(),
        })
}

/// Start this broker's cluster member: bind its own listener if it has
/// one, work out the address the others reach it at, and found or rejoin
/// the cluster with its Raft state under `<data_dir>/.cluster`.
async fn start_cluster(
    config: &BrokerConfig,
    section: &config::ClusterSection,
    transport: &courier_transport::TransportConfig,
    listeners: &mut Vec<courier_transport::Listener>,
    bus: &Bus,
) -> Result<Cluster, BrokerError> {
    use courier_cluster::node::{ClusterNode, NodeConfig};
    let mut members = section.peer_ids()?;
    let timing = section.timing()?;
    section.check_replicated()?;
    let own_listener = match &section.listen {
        Some(listen) => {
            let address: Address = listen.parse().map_err(|err| ConfigError::Invalid {
                key: "cluster.listen",
                reason: format!("{err}"),
            })?;
            let listener = bind(&address, transport).await?;
            let bound = listener.local_addr().clone();
            listeners.push(listener);
            Some(bound)
        }
        None => None,
    };
    let advertise = match &section.advertise {
        Some(advertise) => {
            advertise
                .parse::<Address>()
                .map_err(|err| ConfigError::Invalid {
                    key: "cluster.advertise",
                    reason: format!("{err}"),
                })?;
            advertise.clone()
        }
        None => own_listener
            .or_else(|| listeners.first().map(|l| l.local_addr().clone()))
            .map(|a| a.to_string())
            .unwrap_or_default(),
    };
    // The others must be able to dial this address, and every founding
    // member must list it the same way: 0.0.0.0 is neither.
    let unspecified = match advertise.parse::<Address>() {
        Ok(Address::Tcp { host, .. } | Address::Tls { host, .. }) => host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_unspecified()),
        _ => false,
    };
    if unspecified {
        return Err(ConfigError::Invalid {
            key: "cluster.advertise",
            reason: format!(
                "this node would be known as {advertise}, which other nodes cannot dial: give the address they reach it at with --advertise (or [cluster] advertise)"
            ),
        }
        .into());
    }
    members.insert(section.node, advertise.clone());
    let mut client = courier_rpc::ClientConfig::default();
    client.token = section.token.clone();
    client.transport = client.transport.with_max_frame_size(config.max_frame_size);
    if let Some(ca) = &section.tls_ca {
        let tls =
            courier_transport::TlsClient::trusting(ca).map_err(|err| ConfigError::Invalid {
                key: "cluster.tls_ca",
                reason: err.to_string(),
            })?;
        client.transport = client.transport.with_tls_client(tls);
    }
    let peers = courier_cluster::network::Peers::new(client.clone());
    let node_config = NodeConfig::new(
        section.node,
        advertise,
        members,
        config.data_dir.join(".cluster"),
    )
    .with_timing(timing)
    .with_snapshot_after(section.snapshot_after)
    .with_max_message(config.max_frame_size);
    let node_config = if section.join {
        node_config.joining()
    } else {
        node_config
    };
    let node = ClusterNode::start(
        node_config,
        peers.network(courier_cluster::types::METADATA_GROUP),
    )
    .await?;
    tracing::info!(node = section.node, "cluster member started");
    let route_config = RouteConfig::default()
        .with_buffer(section.route_buffer, section.route_buffer_bytes)
        .with_max_wait(Duration::from_millis(section.route_max_wait_ms));
    let routes = Arc::new(Routes::new(
        bus.clone(),
        section.node,
        client.clone(),
        route_config,
    ));
    let membership = tokio::spawn(follow_membership(node.raft().clone(), routes.clone()));
    let node = Arc::new(node);
    // Opened whatever `shared_queue_log` says: queues created while it was
    // on keep their entries there.
    let wal_dir = config.data_dir.join(".cluster").join("queue-log");
    let wal = if section.shared_queue_log || wal_dir.exists() {
        Some(
            courier_cluster::wal::NodeWal::open(&wal_dir, Default::default())
                .await
                .map_err(courier_cluster::node::StartError::from)?,
        )
    } else {
        None
    };
    let new_queues_share_log = section.shared_queue_log;
    let raft_host = courier_cluster::network::RaftHost::default();
    raft_host.insert(courier_cluster::types::METADATA_GROUP, node.raft().clone());
    let replicated = replicated::Replicated::new(
        node.clone(),
        peers.clone(),
        raft_host.clone(),
        replicated::ReplicatedConfig {
            patterns: section.replicated_queues.clone(),
            replicas: section.queue_replicas,
            max_queues: section.max_replicated_queues,
            settings: courier_cluster::queue_state::QueueSettings::from(
                &config.queue_options().queue,
            ),
            timing,
            snapshot_after: section.snapshot_after,
            max_message: config.max_frame_size,
            dir: config.data_dir.join(".cluster").join("queues"),
            wal,
            new_queues_share_log,
        },
        client,
    );
    let declarations = tokio::spawn(replicated.clone().follow_declarations());
    Ok(Cluster {
        node,
        peers,
        routes,
        membership,
        replicated,
        raft_host,
        declarations,
    })
}

/// Keeps a route to every member of the membership in effect on this node
/// (the latest it has seen, which may not be committed yet; learners
/// included: they serve clients too).
async fn follow_membership(raft: courier_cluster::types::Raft, routes: Arc<Routes>) {
    let mut metrics = raft.metrics();
    let mut last: Option<Vec<(u64, Address)>> = None;
    loop {
        let members: Vec<(u64, Address)> = metrics
            .borrow_and_update()
            .membership_config
            .membership()
            .nodes()
            .filter_map(|(id, node)| node.addr.parse().ok().map(|address| (*id, address)))
            .collect();
        if last.as_ref() != Some(&members) {
            routes.set_peers(members.clone());
            last = Some(members);
        }
        if metrics.changed().await.is_err() {
            return;
        }
    }
}

/// The README's Rust snippets, compiled (never run: each is an `async fn`
/// nobody calls) as doc tests of this crate, the one that depends on every
/// mechanism, so a snippet that no longer builds fails CI.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
pub struct ReadmeSnippets;
