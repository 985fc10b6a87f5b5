//! `courier serve`: a broker in the foreground, configured by a TOML file,
//! then environment variables, then flags (each overriding the one before).
//! The first SIGINT or SIGTERM shuts it down gracefully; a second exits at
//! once.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use courier_broker::{Broker, BrokerConfig, Fsync};

use crate::Failure;

#[derive(Args, Debug)]
#[command(
    after_help = "Examples:\n  courier serve\n  courier serve --listen tcp://0.0.0.0:7878 --listen unix:///tmp/courier.sock --data /var/lib/courier\n  courier serve --config courier.toml --log debug\n  # browsers too (WebSocket gateway, and /courier.js, on port 7880):\n  courier serve --listen tcp://127.0.0.1:7878 --listen ws://127.0.0.1:7880\n  courier serve --listen wss://0.0.0.0:7443 --cert server.pem --key server-key.pem\n  # node 1 of a three-node cluster:\n  courier serve --listen tcp://10.0.0.1:7878 --node 1 --peer 2=tcp://10.0.0.2:7878 --peer 3=tcp://10.0.0.3:7878\n  # a fourth node joining it, then added from anywhere:\n  courier serve --listen tcp://10.0.0.4:7878 --node 4 --join\n  courier --url tcp://10.0.0.1:7878 cluster add-node 4 tcp://10.0.0.4:7878\n  # queues named orders.* replicated on three members (flags on every node):\n  courier serve --listen tcp://10.0.0.1:7878 --node 1 --peer 2=tcp://10.0.0.2:7878 --peer 3=tcp://10.0.0.3:7878 --replicated-queue 'orders.*'\n  courier serve --fsync interval --fsync-interval 20ms --max-deliveries 3\n\nEvery key of the file is documented in the courier-broker crate (config module), and\nevery top-level key is also a variable: COURIER_<KEY>, e.g. COURIER_MAX_DELIVERIES=3\n(file, then variables, then flags, each overriding the one before)."
)]
pub struct ServeArgs {
    /// A TOML configuration file (keys: listen, data_dir, metrics, fsync, ...).
    #[arg(long, env = "COURIER_CONFIG")]
    config: Option<PathBuf>,
    /// An address to serve on (repeat for several): tcp://HOST:PORT,
    /// tls://HOST:PORT, unix://PATH, or ws://HOST:PORT / wss://HOST:PORT
    /// for browsers (the WebSocket gateway, which also serves /courier.js).
    #[arg(long, env = "COURIER_LISTEN", value_delimiter = ',')]
    listen: Vec<String>,
    /// Where queues and durable subscriptions are kept.
    #[arg(long = "data", env = "COURIER_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// HOST:PORT for the Prometheus endpoint (`GET /metrics`); "" for none.
    #[arg(long, env = "COURIER_METRICS")]
    metrics: Option<String>,
    /// When queue writes reach the disk: always, interval or never.
    #[arg(long, env = "COURIER_FSYNC", value_parser = parse_fsync)]
    fsync: Option<Fsync>,
    /// With `--fsync interval`: how long after a write its fsync may come,
    /// e.g. 5ms (the file's `fsync_interval_ms`).
    #[arg(long, value_parser = parse_fsync_interval)]
    fsync_interval: Option<std::time::Duration>,
    /// Deliveries of a message before it goes to its queue's dead-letter
    /// queue (`QUEUE.dlq`), from 1 (the file's `max_deliveries`).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    max_deliveries: Option<u32>,
    /// Log level: error, warn, info, debug or trace.
    #[arg(long, env = "COURIER_LOG")]
    log: Option<String>,
    /// Certificate chain (PEM) for tls:// and wss:// listen addresses.
    #[arg(long = "cert", env = "COURIER_SERVER_CERT")]
    tls_cert: Option<PathBuf>,
    /// Its private key (PEM).
    #[arg(long = "key", env = "COURIER_SERVER_KEY")]
    tls_key: Option<PathBuf>,
    /// Require client certificates signed by this CA (mutual TLS).
    #[arg(long = "client-ca", env = "COURIER_CLIENT_CA")]
    tls_client_ca: Option<PathBuf>,
    /// Grace period for calls in flight at shutdown, e.g. 5s.
    #[arg(long, value_parser = crate::parse_duration)]
    grace: Option<std::time::Duration>,
    /// Run as node N (from 1) of a cluster; its Raft state lives under --data.
    #[arg(long, env = "COURIER_NODE")]
    node: Option<u64>,
    /// Another founding member, as ID=ADDR (repeat for each): ADDR is one of
    /// that node's --listen addresses, or its --cluster-listen.
    #[arg(long = "peer", env = "COURIER_PEERS", value_delimiter = ',', value_parser = parse_peer, requires = "node")]
    peers: Vec<(u64, String)>,
    /// A listener of its own for cluster traffic (default: the first --listen).
    #[arg(long, env = "COURIER_CLUSTER_LISTEN", requires = "node")]
    cluster_listen: Option<String>,
    /// The address other members reach this node at (default: the cluster
    /// listener), for nodes that listen on 0.0.0.0 or behind NAT.
    #[arg(long, env = "COURIER_ADVERTISE", requires = "node")]
    advertise: Option<String>,
    /// Join a running cluster: wait to be added (`courier cluster add-node`)
    /// instead of founding one with the --peer members.
    #[arg(long, requires = "node")]
    join: bool,
    /// Token this node presents to its peers (a user with `cluster = true`).
    #[arg(
        long,
        env = "COURIER_CLUSTER_TOKEN",
        hide_env_values = true,
        requires = "node"
    )]
    cluster_token: Option<String>,
    /// Keep queues of this name (or prefix ending in *) replicated by Raft
    /// across the cluster instead of on this broker alone (repeat for each;
    /// every member should be given the same).
    #[arg(
        long = "replicated-queue",
        env = "COURIER_REPLICATED_QUEUES",
        value_delimiter = ',',
        requires = "node"
    )]
    replicated_queues: Vec<String>,
    /// Replicas of each replicated queue (1 to 5; default 3).
    #[arg(long, env = "COURIER_QUEUE_REPLICAS", requires = "node")]
    queue_replicas: Option<usize>,
}

fn parse_peer(text: &str) -> Result<(u64, String), String> {
    let (id, address) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?}: a peer is ID=ADDR, e.g. 2=tcp://10.0.0.2:7878"))?;
    let id: u64 = id
        .trim()
        .parse()
        .ok()
        .filter(|id| *id > 0)
        .ok_or_else(|| format!("{text:?}: node ids are integers from 1"))?;
    address
        .trim()
        .parse::<courier_transport::Address>()
        .map_err(|err| format!("{text:?}: {err}"))?;
    Ok((id, address.trim().to_string()))
}

fn parse_fsync(text: &str) -> Result<Fsync, String> {
    match text {
        "always" => Ok(Fsync::Always),
        "interval" => Ok(Fsync::Interval),
        "never" => Ok(Fsync::Never),
        other => Err(format!(
            "{other:?} is not an fsync policy (always, interval or never)"
        )),
    }
}

fn parse_fsync_interval(text: &str) -> Result<std::time::Duration, String> {
    let interval = crate::parse_duration(text)?;
    if interval < std::time::Duration::from_millis(1) {
        return Err(format!("{text:?}: the fsync interval is at least 1ms"));
    }
    Ok(interval)
}

fn level(name: &str) -> anyhow::Result<tracing::Level> {
    name.parse().map_err(|_| {
        Failure::usage(format!(
            "{name:?} is not a log level (error, warn, info, debug or trace)"
        ))
        .into()
    })
}

/// `COURIER_*` variables that clap reads itself (as flags of `serve` or as
/// global client options), by the name after `COURIER_`.
const FLAG_VARIABLES: &[&str] = &[
    "CONFIG",
    "LISTEN",
    "DATA_DIR",
    "METRICS",
    "FSYNC",
    "LOG",
    "SERVER_CERT",
    "SERVER_KEY",
    "CLIENT_CA",
    "NODE",
    "PEERS",
    "CLUSTER_LISTEN",
    "ADVERTISE",
    "CLUSTER_TOKEN",
    "REPLICATED_QUEUES",
    "QUEUE_REPLICAS",
    "URL",
    "TOKEN",
    "TLS_CA",
    "TLS_CERT",
    "TLS_KEY",
];

/// Lays `COURIER_<KEY>` variables over `config`, for every top-level key of
/// the file (`COURIER_MAX_DELIVERIES=3` is `max_deliveries = 3`). A value
/// is read as JSON when it parses as JSON (numbers, booleans), else as a
/// string. A `COURIER_*` name that is neither a key nor one of the flags'
/// variables is an error, exactly as an unknown key in the file is: a typo
/// must not silently leave a default in force.
fn apply_environment(
    config: BrokerConfig,
    variables: impl IntoIterator<Item = (String, String)>,
) -> Result<BrokerConfig, String> {
    let serde_json::Value::Object(mut table) =
        serde_json::to_value(&config).map_err(|err| err.to_string())?
    else {
        return Err("the configuration is not a table".into());
    };
    let mut changed = false;
    for (name, raw) in variables {
        let Some(key) = name.strip_prefix("COURIER_") else {
            continue;
        };
        if FLAG_VARIABLES.contains(&key) {
            continue;
        }
        let field = key.to_ascii_lowercase();
        match table.get(&field) {
            Some(serde_json::Value::Object(_)) => {
                return Err(format!(
                    "{name}: the [{field}] section can only be set in the configuration file"
                ))
            }
            Some(_) => {}
            None => {
                let mut known: Vec<String> = table
                    .iter()
                    .filter(|(_, v)| !v.is_object())
                    .map(|(k, _)| format!("COURIER_{}", k.to_ascii_uppercase()))
                    .collect();
                known.extend(FLAG_VARIABLES.iter().map(|v| format!("COURIER_{v}")));
                known.sort();
                known.dedup();
                return Err(format!(
                    "{name} is not a setting; the COURIER_* variables are: {}",
                    known.join(", ")
                ));
            }
        }
        let value = serde_json::from_str::<serde_json::Value>(&raw)
            .ok()
            .filter(|v| !v.is_object() && !v.is_array())
            .unwrap_or(serde_json::Value::String(raw));
        table.insert(field, value);
        changed = true;
    }
    if !changed {
        return Ok(config);
    }
    serde_json::from_value(serde_json::Value::Object(table))
        .map_err(|err| format!("in the COURIER_* environment variables: {err}"))
}

/// The configuration the arguments describe.
fn config(args: ServeArgs) -> anyhow::Result<BrokerConfig> {
    let config = match &args.config {
        Some(path) => BrokerConfig::load(path).map_err(Failure::usage)?,
        None => BrokerConfig::default(),
    };
    let mut config = apply_environment(config, std::env::vars()).map_err(Failure::usage)?;
    if !args.listen.is_empty() {
        config.listen = args.listen;
    }
    if let Some(dir) = args.data_dir {
        config.data_dir = dir;
    }
    if let Some(metrics) = args.metrics {
        config.metrics = metrics;
    }
    if let Some(fsync) = args.fsync {
        config.fsync = fsync;
    }
    if let Some(interval) = args.fsync_interval {
        config.fsync_interval_ms = interval.as_millis() as u64;
    }
    if let Some(deliveries) = args.max_deliveries {
        config.max_deliveries = deliveries;
    }
    if let Some(log) = args.log {
        config.log = log;
    }
    if args.tls_cert.is_some() {
        config.tls_cert = args.tls_cert;
    }
    if args.tls_key.is_some() {
        config.tls_key = args.tls_key;
    }
    if args.tls_client_ca.is_some() {
        config.tls_client_ca = args.tls_client_ca;
    }
    if let Some(grace) = args.grace {
        config.shutdown_grace_ms = grace.as_millis() as u64;
    }
    if let Some(node) = args.node {
        let mut cluster = config.cluster.take().unwrap_or_default();
        cluster.node = node;
        if !args.peers.is_empty() {
            cluster.peers = args
                .peers
                .into_iter()
                .map(|(id, address)| (id.to_string(), address))
                .collect();
        }
        if args.cluster_listen.is_some() {
            cluster.listen = args.cluster_listen;
        }
        if args.advertise.is_some() {
            cluster.advertise = args.advertise;
        }
        if args.join {
            cluster.join = true;
        }
        if let Some(token) = args.cluster_token {
            cluster.token = Some(courier_rpc::Secret::new(token));
        }
        if !args.replicated_queues.is_empty() {
            cluster.replicated_queues = args.replicated_queues;
        }
        if let Some(replicas) = args.queue_replicas {
            cluster.queue_replicas = replicas;
        }
        config.cluster = Some(cluster);
    }
    if let Some(cluster) = &config.cluster {
        cluster.peer_ids().map_err(Failure::usage)?;
        cluster.timing().map_err(Failure::usage)?;
        cluster.check_replicated().map_err(Failure::usage)?;
    }
    Ok(config)
}

pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let config = config(args)?;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let level = level(&config.log)?;
    // openraft reports every vote, heartbeat and replication step at info:
    // below debug, a broker's log carries only its warnings and errors.
    let raft = match level {
        tracing::Level::ERROR => tracing::Level::ERROR,
        level if level >= tracing::Level::DEBUG => level,
        _ => tracing::Level::WARN,
    };
    tracing_subscriber::fmt()
        .with_max_level(level)
        .with_ansi(colours(
            std::io::IsTerminal::is_terminal(&std::io::stderr()),
            std::env::var_os("NO_COLOR"),
        ))
        .with_writer(std::io::stderr)
        .finish()
        .with(
            tracing_subscriber::filter::Targets::new()
                .with_default(level)
                .with_target("openraft", raft),
        )
        .init();
    // Flag and file mistakes are usage errors (exit 2), found before binding.
    config.addresses().map_err(Failure::usage)?;
    config.web_listen().map_err(Failure::usage)?;
    config.metrics_address().map_err(Failure::usage)?;
    // Handled from before the first `listening` line: a SIGTERM sent as
    // soon as the broker says it listens must shut it down gracefully, not
    // kill it by the default action.
    let mut signals = Signals::install()?;
    let broker = Broker::start(config.clone())
        .await
        .context("cannot start the broker")?;
    // One line per address on stdout, so scripts (and tests) can find a
    // port chosen with :0.
    for address in broker.addresses() {
        println!("listening {address}");
    }
    // Browsers: the WebSocket URL (its /courier.js is the client module).
    for address in broker.web_addresses() {
        println!("listening {address}");
    }
    if let Some(metrics) = broker.metrics_address() {
        println!("metrics http://{metrics}/metrics");
    }
    println!("data {}", config.data_dir.display());
    let grace = std::time::Duration::from_millis(config.shutdown_grace_ms);

    signals.next().await?;
    tracing::info!("shutting down (a second signal exits at once)");
    tokio::spawn(async move {
        if signals.next().await.is_ok() {
            eprintln!("courier: second signal, exiting now");
            std::process::exit(130);
        }
    });
    // A hard deadline over everything: past it the process exits whatever
    // is still running (a disk that stopped answering, say). What was
    // acknowledged is on disk already under `fsync = always`, and in the
    // page cache otherwise, which outlives the process.
    let hard = grace + HARD_DEADLINE_MARGIN;
    if tokio::time::timeout(hard, broker.shutdown()).await.is_err() {
        eprintln!("courier: shutdown did not finish within {hard:?}, exiting now");
        std::process::exit(1);
    }
    Ok(())
}

/// Whether the log is coloured: only on a terminal, and not when
/// `NO_COLOR` is set to anything but "" (<https://no-color.org>). A log
/// redirected to a file or a pipe never carries escape codes.
fn colours(terminal: bool, no_color: Option<std::ffi::OsString>) -> bool {
    terminal && no_color.is_none_or(|value| value.is_empty())
}

/// How long after the grace period `courier serve` exits whatever is left.
const HARD_DEADLINE_MARGIN: std::time::Duration = std::time::Duration::from_secs(10);

/// SIGINT and SIGTERM, handled (not fatal) from the moment they are
/// installed.
#[cfg(unix)]
struct Signals {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
}

#[cfg(unix)]
impl Signals {
    fn install() -> anyhow::Result<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            interrupt: signal(SignalKind::interrupt()).context("cannot handle SIGINT")?,
            terminate: signal(SignalKind::terminate()).context("cannot handle SIGTERM")?,
        })
    }

    /// The next of either.
    async fn next(&mut self) -> anyhow::Result<()> {
        tokio::select! {
            _ = self.interrupt.recv() => {}
            _ = self.terminate.recv() => {}
        }
        Ok(())
    }
}

#[cfg(not(unix))]
struct Signals;

#[cfg(not(unix))]
impl Signals {
    fn install() -> anyhow::Result<Signals> {
        Ok(Signals)
    }

    async fn next(&mut self) -> anyhow::Result<()> {
        tokio::signal::ctrl_c()
            .await
            .context("cannot handle Ctrl-C")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[derive(clap::Parser)]
    struct Serve {
        #[command(flatten)]
        args: ServeArgs,
    }

    fn parse(args: &[&str]) -> Result<ServeArgs, clap::Error> {
        use clap::Parser;
        Serve::try_parse_from(std::iter::once("serve").chain(args.iter().copied()))
            .map(|serve| serve.args)
    }

    #[test]
    fn the_queue_keys_have_flags_too() {
        let config = config(
            parse(&[
                "--fsync",
                "interval",
                "--fsync-interval",
                "20ms",
                "--max-deliveries",
                "3",
            ])
            .unwrap(),
        )
        .unwrap();
        assert_eq!(config.fsync, Fsync::Interval);
        assert_eq!(config.fsync_interval_ms, 20);
        assert_eq!(config.max_deliveries, 3);
        for bad in [
            &["--max-deliveries", "0"][..],
            &["--max-deliveries", "many"],
            &["--fsync-interval", "0ms"],
            &["--fsync-interval", "soon"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn logs_are_coloured_only_on_a_terminal_without_no_color() {
        assert!(colours(true, None));
        assert!(colours(true, Some("".into())));
        assert!(!colours(true, Some("1".into())));
        assert!(!colours(false, None));
        assert!(!colours(false, Some("1".into())));
    }

    #[test]
    fn every_key_of_the_file_is_also_a_variable() {
        let config = apply_environment(
            BrokerConfig::default(),
            vars(&[
                ("COURIER_MAX_DELIVERIES", "3"),
                ("COURIER_FSYNC_INTERVAL_MS", "20"),
                ("COURIER_FSYNC", "never"), // a flag's variable: clap's to read
                ("PATH", "/bin"),
            ]),
        )
        .unwrap();
        assert_eq!(config.max_deliveries, 3);
        assert_eq!(config.fsync_interval_ms, 20);
        assert_eq!(config.fsync, BrokerConfig::default().fsync);
    }

    #[test]
    fn an_unknown_variable_is_an_error_like_an_unknown_key() {
        let err = apply_environment(
            BrokerConfig::default(),
            vars(&[("COURIER_MAX_DELIVERYS", "3")]),
        )
        .unwrap_err();
        assert!(
            err.contains("COURIER_MAX_DELIVERYS is not a setting"),
            "{err}"
        );
        assert!(err.contains("COURIER_MAX_DELIVERIES"), "{err}");
        let err = apply_environment(
            BrokerConfig::default(),
            vars(&[("COURIER_MAX_DELIVERIES", "many")]),
        )
        .unwrap_err();
        assert!(err.contains("COURIER_"), "{err}");
    }
}
