//! The broker's settings: a TOML file, every key optional, with defaults
//! that work with no file at all. The `courier` command lays flags and
//! environment variables over the file.
//!
//! ```toml
//! # Addresses to serve on (tcp://, tls://, unix://, and ws:// or wss:// for
//! # browsers: the WebSocket gateway of courier-web), all at once.
//! listen = ["tcp://127.0.0.1:7878", "unix:///run/courier.sock", "ws://127.0.0.1:7880"]
//! # Queues, durable subscriptions and their registry.
//! data_dir = "/var/lib/courier"
//! # HTTP endpoint: dashboard at /, JSON at /api/stats, Prometheus text at
//! # /metrics ("" turns it off).
//! metrics = "127.0.0.1:7879"
//! # Its connections at once (more are closed as they arrive), and the time
//! # each has to send its request and be answered.
//! metrics_max_connections = 32
//! metrics_request_timeout_ms = 5000
//! # Pages (origins: scheme, host, port) whose scripts may open a browser
//! # WebSocket (ws://, wss://); others get HTTP 403. Empty (the default):
//! # any page, including other websites' in a user's browser, so list your
//! # pages when the gateway is reachable from browsers without tokens. As
//! # COURIER_WEB_ALLOWED_ORIGINS, a comma-separated list.
//! web_allowed_origins = ["https://app.example.com", "http://localhost:8080"]
//! # "always" (fsync before acknowledging), "interval", or "never".
//! fsync = "always"
//! fsync_interval_ms = 5
//! # A delivery not acknowledged within this comes back.
//! visibility_timeout_ms = 30000
//! # Deliveries before a message goes to the dead-letter queue.
//! max_deliveries = 5
//! # On shutdown, calls in flight get this long to finish.
//! shutdown_grace_ms = 5000
//! # Largest frame accepted from a client (and announced to it).
//! max_frame_size = 4194304
//! # Calls running at once per connection (then the connection waits).
//! max_in_flight = 256
//! # Subscriptions and consumers open at once per connection (more are refused).
//! max_streams = 10000
//! # Pings on idle connections; a peer silent for 3 intervals is dropped.
//! heartbeat_ms = 5000
//! # Log level: error, warn, info, debug, trace.
//! log = "info"
//! # TLS for tls:// and wss:// listen addresses (PEM files); with a client
//! # CA, every tls:// client must present a certificate it signed (mutual
//! # TLS). Browsers on wss:// prove who they are with tokens, not
//! # certificates.
//! tls_cert = "server.pem"
//! tls_key = "server-key.pem"
//! tls_client_ca = "ca.pem"
//! # Limits. Browser (ws://, wss://) connections are held to the same
//! # max_connections, counted apart; handshake and idle timeouts apply to
//! # them too, and they may publish payloads of up to max_frame_size / 4.
//! max_connections = 10000
//! reserved_admin_connections = 8  # of max_connections, kept for admins
//! max_connections_per_identity = 1000
//! handshake_timeout_ms = 5000     # TLS, preamble and hello together
//! idle_timeout_ms = 0             # 0: idle connections stay open
//! max_queue_depth = 1000000       # messages per queue
//! # Bytes buffered for subscribers that fall behind, in total and per
//! # subscription; past either, the subscription's slow-consumer policy
//! # applies and the drops are counted and reported to it.
//! max_buffered_bytes = 1073741824
//! max_subscription_bytes = 67108864
//! # Who may do what: see the auth module.
//! [auth]
//! required = false
//! # Run as a member of a cluster (leave out for a single broker). Node ids
//! # are integers from 1; every founding member lists all the others.
//! [cluster]
//! node = 1
//! peers = { 2 = "tcp://10.0.0.2:7878", 3 = "tcp://10.0.0.3:7878" }
//! # Cluster traffic shares the first listen address unless given its own.
//! listen = "tcp://10.0.0.1:7880"
//! # The address the other members reach this node at (default: `listen`,
//! # else the first `listen` address of the broker).
//! advertise = "tcp://10.0.0.1:7880"
//! # Token this node presents to its peers (brokers with [auth] users need
//! # one of a user with `cluster = true`; without users, anyone who can
//! # reach a node may send it Raft traffic), and the CA it trusts for tls://.
//! token = "..."
//! tls_ca = "ca.pem"
//! heartbeat_ms = 250
//! election_min_ms = 1000
//! election_max_ms = 2000
//! snapshot_after = 10000
//! # Pub/sub routes to the other members: messages buffered per peer
//! # before newer ones are dropped (and counted), by count and by bytes.
//! route_buffer = 65536
//! route_buffer_bytes = 67108864
//! # How long a publisher waits for room in a full route before the route
//! # is marked slow and drops (0: never wait).
//! route_max_wait_ms = 250
//! # A node added to a running cluster starts with join = true, then
//! # `courier cluster add-node ID ADDR` adds it (it never founds a cluster).
//! join = false
//! # Queues replicated by Raft over `queue_replicas` members (names, or
//! # prefixes ending in *), so that an acknowledged message survives the
//! # loss of a minority of them; clients may use any member. See the
//! # broker's crate docs for what an answer means.
//! replicated_queues = ["orders", "jobs.*"]
//! queue_replicas = 3
//! max_replicated_queues = 1000
//! # The replicated queues of a node write their Raft entries to one log
//! # (one fsync per batch for all of them); false gives each new queue a
//! # log of its own. A queue keeps the kind it was created with.
//! shared_queue_log = true
//! ```

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use courier_pubsub::BusConfig;
use courier_queue::core::QueueConfig;
use courier_queue::log::{FsyncPolicy, LogOptions};
use courier_queue::QueueOptions;
use courier_transport::{Address, Heartbeat, TlsServer, TransportConfig};

/// When queue writes are fsynced.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Fsync {
    /// Before an enqueue or ack is acknowledged (group commit).
    Always,
    /// At most `fsync_interval_ms` after a write.
    Interval,
    /// Never; the operating system writes back when it likes.
    Never,
}

/// Everything the broker can be told. See the module docs for the file.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct BrokerConfig {
    /// Addresses to serve on: `tcp://`, `tls://`, `unix://` (and the
    /// transport's others) for Courier clients, `ws://HOST:PORT` and
    /// `wss://HOST:PORT` for browsers. Default `tcp://127.0.0.1:7878`.
    pub listen: Vec<String>,
    /// Where queues and durable subscriptions live. Default
    /// `$XDG_DATA_HOME/courier`, else `~/.local/share/courier`, else
    /// `./courier-data`.
    pub data_dir: PathBuf,
    /// The HTTP address of the Prometheus endpoint; empty for none.
    /// Default `127.0.0.1:7879`.
    pub metrics: String,
    /// Default `always`.
    pub fsync: Fsync,
    /// For `fsync = "interval"`. Default 5.
    pub fsync_interval_ms: u64,
    /// Default 30,000.
    pub visibility_timeout_ms: u64,
    /// Default 5.
    pub max_deliveries: u32,
    /// Default 5,000.
    pub shutdown_grace_ms: u64,
    /// Default 4 MiB (the transport's default).
    pub max_frame_size: usize,
    /// Default 256.
    pub max_in_flight: usize,
    /// Default 10,000.
    pub max_streams: usize,
    /// 0 for no heartbeats. Default 5,000.
    pub heartbeat_ms: u64,
    /// Default `info`.
    pub log: String,
    /// Certificate chain (PEM) for `tls://` and `wss://` listen addresses.
    pub tls_cert: Option<PathBuf>,
    /// Its private key (PEM).
    pub tls_key: Option<PathBuf>,
    /// Require client certificates signed by this CA (PEM): mutual TLS.
    pub tls_client_ca: Option<PathBuf>,
    /// Default 10,000.
    pub max_connections: usize,
    /// Of `max_connections`, how many only users with `admin = true` may
    /// take, so an operator can still reach a full broker. Held back only
    /// when users are configured (an open broker has no admins). Default 8.
    pub reserved_admin_connections: usize,
    /// Default 1,000.
    pub max_connections_per_identity: usize,
    /// Default 5,000.
    pub handshake_timeout_ms: u64,
    /// 0 for none. Default 0.
    pub idle_timeout_ms: u64,
    /// Default 1,000,000.
    pub max_queue_depth: u64,
    /// Bytes buffered for all subscribers together. Default 1 GiB.
    pub max_buffered_bytes: usize,
    /// Bytes buffered for one subscription. Default 64 MiB.
    pub max_subscription_bytes: usize,
    /// Connections the HTTP endpoint serves at once. Default 32
    /// ([`metrics::MAX_CONNECTIONS`](crate::metrics::MAX_CONNECTIONS)).
    pub metrics_max_connections: usize,
    /// Time the HTTP endpoint gives a request head, and the whole
    /// exchange. Default 5,000.
    pub metrics_request_timeout_ms: u64,
    /// Origins whose pages may open a browser WebSocket (exact, as
    /// `https://app.example.com`); empty for any. In the environment, a
    /// comma-separated list. Default empty.
    #[serde(deserialize_with = "list_or_commas")]
    pub web_allowed_origins: Vec<String>,
    /// Who may connect and do what.
    pub auth: crate::auth::AuthConfig,
    /// Cluster membership; `None` for a single broker (no Raft at all).
    pub cluster: Option<ClusterSection>,
}

/// An origin as browsers send it: `scheme://host` or `scheme://host:port`,
/// nothing after (a path or a trailing `/` would never match).
fn check_origin(origin: &str) -> Result<(), String> {
    let Some((scheme, rest)) = origin.split_once("://") else {
        return Err("expected an origin such as https://app.example.com".into());
    };
    if scheme.is_empty()
        || !scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
    {
        return Err("not a scheme".into());
    }
    if rest.is_empty() || rest.contains(['/', '?', '#', ' ', '@']) {
        return Err("an origin is scheme://host[:port], with no path".into());
    }
    Ok(())
}

/// The data directory used when none is configured.
pub fn default_data_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("XDG_DATA_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("courier");
    }
    if let Some(home) = std::env::var_os("HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(home).join(".local/share/courier");
    }
    PathBuf::from("courier-data")
}

impl Default for BrokerConfig {
    fn default() -> Self {
        let queue = QueueConfig::default();
        let bus = BusConfig::default();
        BrokerConfig {
            listen: vec!["tcp://127.0.0.1:7878".into()],
            data_dir: default_data_dir(),
            metrics: "127.0.0.1:7879".into(),
            fsync: Fsync::Always,
            fsync_interval_ms: 5,
            visibility_timeout_ms: queue.visibility_timeout.as_millis() as u64,
            max_deliveries: queue.max_deliveries,
            shutdown_grace_ms: 5_000,
            max_frame_size: TransportConfig::default().max_frame_size,
            max_in_flight: 256,
            max_streams: 10_000,
            heartbeat_ms: 5_000,
            log: "info".into(),
            tls_cert: None,
            tls_key: None,
            tls_client_ca: None,
            max_connections: 10_000,
            reserved_admin_connections: 8,
            max_connections_per_identity: 1_000,
            handshake_timeout_ms: 5_000,
            idle_timeout_ms: 0,
            max_queue_depth: queue.max_depth,
            max_buffered_bytes: bus.max_buffered_bytes,
            max_subscription_bytes: bus.max_subscription_bytes,
            metrics_max_connections: crate::metrics::MAX_CONNECTIONS,
            metrics_request_timeout_ms: crate::metrics::REQUEST_TIMEOUT.as_millis() as u64,
            web_allowed_origins: Vec::new(),
            auth: Default::default(),
            cluster: None,
        }
    }
}

/// A list of strings, or one string of comma-separated items (as a
/// `COURIER_*` variable gives it).
fn list_or_commas<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Vec<String>, D::Error> {
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum Either {
        List(Vec<String>),
        Commas(String),
    }
    Ok(
        match <Either as serde::Deserialize>::deserialize(deserializer)? {
            Either::List(list) => list,
            Either::Commas(text) => text
                .split(',')
                .map(str::trim)
                .filter(|item| !item.is_empty())
                .map(String::from)
                .collect(),
        },
    )
}

/// The `[cluster]` section: see the module docs.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct ClusterSection {
    /// This node's id, from 1.
    pub node: u64,
    /// The other founding members: id (as a TOML key) → address.
    pub peers: std::collections::BTreeMap<String, String>,
    /// Its own listener for cluster traffic; default: the broker's first.
    pub listen: Option<String>,
    /// The address the others reach this node at.
    pub advertise: Option<String>,
    /// Presented to peers.
    pub token: Option<courier_rpc::Secret>,
    /// The CA trusted for tls:// peers (PEM).
    pub tls_ca: Option<PathBuf>,
    /// Default 250.
    pub heartbeat_ms: u64,
    /// Default 1,000.
    pub election_min_ms: u64,
    /// Default 2,000.
    pub election_max_ms: u64,
    /// Entries between snapshots. Default 10,000.
    pub snapshot_after: u64,
    /// Messages a pub/sub route buffers for one peer. Default 65,536.
    pub route_buffer: usize,
    /// Bytes a pub/sub route buffers for one peer. Default 64 MiB.
    pub route_buffer_bytes: usize,
    /// How long a publisher waits for room in a full route. Default 250.
    pub route_max_wait_ms: u64,
    /// Join a running cluster (wait to be added with `courier cluster
    /// add-node`) instead of founding one with `peers`. Default false.
    pub join: bool,
    /// Queues kept in Raft groups of their own, replicated over
    /// `queue_replicas` members, instead of in one broker's data
    /// directory: names, or prefixes ending in `*` (`["orders.*"]`, or
    /// `["*"]` for every queue but durable subscriptions', `durable.*`,
    /// which the broker hosting each subscription keeps; a pattern naming
    /// them is refused). Default none. Every member should be given the
    /// same list.
    pub replicated_queues: Vec<String>,
    /// Replicas of each replicated queue: 1 to 5, at most the members.
    /// Default 3.
    pub queue_replicas: usize,
    /// Replicated queues the cluster holds at most. Default 1,000.
    pub max_replicated_queues: usize,
    /// Whether the replicated queues of this node write their entries to
    /// one log shared by all of them (`courier_cluster::wal`: one fsync
    /// per batch, whatever the number of queues) rather than a log each.
    /// Applies to queues created from now on. Default true.
    pub shared_queue_log: bool,
}

impl Default for ClusterSection {
    fn default() -> Self {
        let timing = courier_cluster::node::Timing::default();
        ClusterSection {
            node: 0,
            peers: Default::default(),
            listen: None,
            advertise: None,
            token: None,
            tls_ca: None,
            heartbeat_ms: timing.heartbeat_ms,
            election_min_ms: timing.election_min_ms,
            election_max_ms: timing.election_max_ms,
            snapshot_after: 10_000,
            route_buffer: courier_pubsub::route::RouteConfig::default().buffer_messages,
            route_buffer_bytes: courier_pubsub::route::RouteConfig::default().buffer_bytes,
            route_max_wait_ms: courier_pubsub::route::RouteConfig::default()
                .max_wait
                .as_millis() as u64,
            join: false,
            replicated_queues: Vec::new(),
            queue_replicas: 3,
            max_replicated_queues: 1_000,
            shared_queue_log: true,
        }
    }
}

impl ClusterSection {
    /// The peers with their ids parsed, checked: ids from 1, not this
    /// node's, addresses that parse.
    pub fn peer_ids(&self) -> Result<std::collections::BTreeMap<u64, String>, ConfigError> {
        if self.node == 0 {
            return Err(ConfigError::Invalid {
                key: "cluster.node",
                reason: "node ids are integers from 1".into(),
            });
        }
        let mut peers = std::collections::BTreeMap::new();
        for (id, address) in &self.peers {
            let parsed: u64 = id.trim().parse().map_err(|_| ConfigError::Invalid {
                key: "cluster.peers",
                reason: format!("{id:?} is not a node id (an integer from 1)"),
            })?;
            if parsed == 0 || parsed == self.node {
                return Err(ConfigError::Invalid {
                    key: "cluster.peers",
                    reason: format!("peer id {parsed} must be from 1 and not this node's own"),
                });
            }
            address
                .parse::<Address>()
                .map_err(|err| ConfigError::Invalid {
                    key: "cluster.peers",
                    reason: format!("node {parsed}: {err}"),
                })?;
            peers.insert(parsed, address.clone());
        }
        Ok(peers)
    }

    /// The replicated queues' settings, checked: patterns that are
    /// names or `*`-ended prefixes, 1 to 5 replicas.
    pub fn check_replicated(&self) -> Result<(), ConfigError> {
        let max = courier_cluster::node::MAX_QUEUE_REPLICAS;
        if self.queue_replicas == 0 || self.queue_replicas > max {
            return Err(ConfigError::Invalid {
                key: "cluster.queue_replicas",
                reason: format!("{} replicas: 1 to {max}", self.queue_replicas),
            });
        }
        if self.max_replicated_queues == 0 {
            return Err(ConfigError::Invalid {
                key: "cluster.max_replicated_queues",
                reason: "at least 1".into(),
            });
        }
        for pattern in &self.replicated_queues {
            let name = pattern.strip_suffix('*').unwrap_or(pattern);
            if name.contains('*') || (name.is_empty() && pattern != "*") {
                return Err(ConfigError::Invalid {
                    key: "cluster.replicated_queues",
                    reason: format!(
                        "{pattern:?}: a queue name, or a prefix ending in * (\"orders.*\", \"*\")"
                    ),
                });
            }
            if name.starts_with(courier_pubsub::durable::QUEUE_PREFIX) {
                return Err(ConfigError::Invalid {
                    key: "cluster.replicated_queues",
                    reason: format!(
                        "{pattern:?}: durable subscriptions' queues are kept by the broker hosting the subscription, not replicated"
                    ),
                });
            }
        }
        Ok(())
    }

    /// Raft's timers.
    pub fn timing(&self) -> Result<courier_cluster::node::Timing, ConfigError> {
        if self.heartbeat_ms == 0
            || self.election_min_ms <= self.heartbeat_ms
            || self.election_max_ms <= self.election_min_ms
        {
            return Err(ConfigError::Invalid {
                key: "cluster.election_min_ms",
                reason: "need 0 < heartbeat_ms < election_min_ms < election_max_ms".into(),
            });
        }
        Ok(courier_cluster::node::Timing {
            heartbeat_ms: self.heartbeat_ms,
            election_min_ms: self.election_min_ms,
            election_max_ms: self.election_max_ms,
        })
    }
}

/// A browser listen address: `host:port`, and whether it is `wss://`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WebListen {
    /// `HOST:PORT`, as given.
    pub address: String,
    /// `wss://` (TLS) rather than `ws://`.
    pub tls: bool,
}

/// `Some((tls, rest))` for a `ws://` or `wss://` address.
fn web_scheme(address: &str) -> Option<(bool, &str)> {
    if let Some(rest) = address.strip_prefix("wss://") {
        Some((true, rest))
    } else {
        address.strip_prefix("ws://").map(|rest| (false, rest))
    }
}

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// What the system said.
        source: std::io::Error,
    },
    /// The file is not valid TOML, or has an unknown key or a wrong type.
    #[error("{path}: {reason}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong, and where.
        reason: String,
    },
    /// A value is out of range or malformed.
    #[error("invalid {key}: {reason}")]
    Invalid {
        /// The key.
        key: &'static str,
        /// Why.
        reason: String,
    },
}

impl BrokerConfig {
    /// Reads a TOML file; missing keys take their defaults.
    pub fn load(path: &Path) -> Result<BrokerConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        BrokerConfig::parse(&text).map_err(|reason| ConfigError::Parse {
            path: path.to_path_buf(),
            reason,
        })
    }

    /// Parses TOML text; the error says what is wrong and where.
    pub fn parse(text: &str) -> Result<BrokerConfig, String> {
        toml::from_str(text).map_err(|err| err.to_string().trim_end().to_string())
    }

    /// The listen addresses for Courier clients, parsed (the `ws://` and
    /// `wss://` ones are [`web_listen`](Self::web_listen)'s); every browser
    /// address is checked too.
    pub fn addresses(&self) -> Result<Vec<Address>, ConfigError> {
        if self.listen.is_empty() {
            return Err(ConfigError::Invalid {
                key: "listen",
                reason: "at least one address is needed".into(),
            });
        }
        self.web_listen()?;
        self.listen
            .iter()
            .filter(|a| web_scheme(a).is_none())
            .map(|a| {
                a.parse().map_err(|err| ConfigError::Invalid {
                    key: "listen",
                    reason: format!("{err}"),
                })
            })
            .collect()
    }

    /// The browser listen addresses (`ws://HOST:PORT`, `wss://HOST:PORT`),
    /// checked.
    pub fn web_listen(&self) -> Result<Vec<WebListen>, ConfigError> {
        let mut found = Vec::new();
        for listen in &self.listen {
            let Some((tls, rest)) = web_scheme(listen) else {
                continue;
            };
            let invalid = |reason: String| ConfigError::Invalid {
                key: "listen",
                reason: format!("{listen:?}: {reason}"),
            };
            // A path (or a trailing slash) would suggest the gateway serves
            // somewhere else than `/`; it does not.
            let host_port = rest.strip_suffix('/').unwrap_or(rest);
            if host_port.contains('/') || host_port.is_empty() {
                return Err(invalid("expected ws://HOST:PORT or wss://HOST:PORT".into()));
            }
            let (host, port) = host_port
                .rsplit_once(':')
                .ok_or_else(|| invalid("a port is needed (ws://HOST:PORT)".into()))?;
            port.parse::<u16>()
                .map_err(|_| invalid(format!("{port:?} is not a port")))?;
            let host = host.trim_start_matches('[').trim_end_matches(']');
            if host.is_empty() {
                return Err(invalid("a host is needed (ws://127.0.0.1:7880)".into()));
            }
            found.push(WebListen {
                address: host_port.to_string(),
                tls,
            });
        }
        for origin in &self.web_allowed_origins {
            check_origin(origin).map_err(|reason| ConfigError::Invalid {
                key: "web_allowed_origins",
                reason: format!("{origin:?}: {reason}"),
            })?;
        }
        Ok(found)
    }

    /// The HTTP endpoint's limits.
    pub fn metrics_limits(&self) -> crate::metrics::EndpointLimits {
        crate::metrics::EndpointLimits::default()
            .with_max_connections(self.metrics_max_connections)
            .with_request_timeout(Duration::from_millis(
                self.metrics_request_timeout_ms.max(1),
            ))
    }

    /// The gateway's limits, from the broker's: its connection limit and
    /// timeouts, and a payload limit of a quarter of the frame limit (so a
    /// browser's message fits any Rust subscriber's stream item with room
    /// to spare).
    pub fn web_config(&self) -> courier_web::GatewayConfig {
        let idle = (self.idle_timeout_ms > 0).then(|| Duration::from_millis(self.idle_timeout_ms));
        courier_web::GatewayConfig::default()
            .with_max_connections(self.max_connections)
            .with_max_payload((self.max_frame_size / 4).max(1))
            .with_connect_timeout(Duration::from_millis(self.handshake_timeout_ms.max(1)))
            .with_idle_timeout(idle)
            .with_allowed_origins(self.web_allowed_origins.iter().cloned())
    }

    /// TLS for `wss://` listen addresses, if there are any (then `tls_cert`
    /// and `tls_key` are needed).
    pub fn web_tls(&self) -> Result<Option<Arc<rustls::ServerConfig>>, ConfigError> {
        if !self.web_listen()?.iter().any(|w| w.tls) {
            return Ok(None);
        }
        match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => courier_web::tls_config_from_pem(cert, key)
                .map(Some)
                .map_err(|err| ConfigError::Invalid {
                    key: "tls_cert",
                    reason: err.to_string(),
                }),
            _ => Err(ConfigError::Invalid {
                key: "tls_cert",
                reason: "wss:// listen addresses need both tls_cert and tls_key".into(),
            }),
        }
    }

    /// The metrics address, if any.
    pub fn metrics_address(&self) -> Result<Option<std::net::SocketAddr>, ConfigError> {
        if self.metrics.is_empty() {
            return Ok(None);
        }
        self.metrics
            .parse()
            .map(Some)
            .map_err(|err| ConfigError::Invalid {
                key: "metrics",
                reason: format!(
                    "{:?}: {err} (expected host:port, e.g. 127.0.0.1:7879)",
                    self.metrics
                ),
            })
    }

    /// Queue settings from this configuration.
    pub fn queue_options(&self) -> QueueOptions {
        let fsync = match self.fsync {
            Fsync::Always => FsyncPolicy::Always,
            Fsync::Interval => {
                FsyncPolicy::Interval(Duration::from_millis(self.fsync_interval_ms.max(1)))
            }
            Fsync::Never => FsyncPolicy::Never,
        };
        QueueOptions::new(
            LogOptions::default().with_fsync(fsync),
            QueueConfig::default()
                .with_visibility_timeout(Duration::from_millis(self.visibility_timeout_ms.max(1)))
                .with_max_deliveries(self.max_deliveries.max(1))
                .with_max_depth(self.max_queue_depth),
        )
    }

    /// Bus settings from this configuration.
    pub fn bus_config(&self) -> BusConfig {
        BusConfig::default()
            .with_max_buffered_bytes(self.max_buffered_bytes)
            .with_max_subscription_bytes(self.max_subscription_bytes)
    }

    /// Transport settings from this configuration, with TLS if configured.
    pub fn transport(&self) -> Result<TransportConfig, ConfigError> {
        let mut transport = TransportConfig::default().with_max_frame_size(self.max_frame_size);
        transport.handshake_timeout = Duration::from_millis(self.handshake_timeout_ms.max(1));
        if self.heartbeat_ms > 0 {
            transport = transport
                .with_heartbeat(Heartbeat::every(Duration::from_millis(self.heartbeat_ms)));
        }
        let wants_tls = self.listen.iter().any(|a| a.starts_with("tls://"));
        match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => {
                let tls = match &self.tls_client_ca {
                    Some(ca) => TlsServer::with_mutual_tls(cert, key, ca),
                    None => TlsServer::from_pem_files(cert, key),
                }
                .map_err(|err| ConfigError::Invalid {
                    key: "tls_cert",
                    reason: err.to_string(),
                })?;
                transport = transport.with_tls_server(tls);
            }
            (None, None) if !wants_tls => {}
            _ => {
                return Err(ConfigError::Invalid {
                    key: "tls_cert",
                    reason: "tls:// listen addresses need both tls_cert and tls_key".into(),
                })
            }
        }
        Ok(transport)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_patterns(patterns: &[&str]) -> Result<(), ConfigError> {
        let section = ClusterSection {
            replicated_queues: patterns.iter().map(|p| p.to_string()).collect(),
            ..Default::default()
        };
        section.check_replicated()
    }

    #[test]
    fn replicated_queue_patterns_are_names_or_prefixes_but_never_durable_subscriptions() {
        assert!(with_patterns(&["*", "orders.*", "jobs", "d*"]).is_ok());
        assert!(with_patterns(&["or*ders"]).is_err());
        assert!(with_patterns(&["**"]).is_err());
        for durable in ["durable.*", "durable.audit"] {
            let refused = with_patterns(&[durable]).unwrap_err().to_string();
            assert!(refused.contains("durable subscriptions"), "{refused}");
        }
    }
}
