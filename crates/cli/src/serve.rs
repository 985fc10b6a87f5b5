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
    after_help = "Examples:\n  courier serve\n  courier serve --listen tcp://0.0.0.0:7878 --listen unix:///tmp/courier.sock --data /var/lib/courier\n  courier serve --config courier.toml --log debug\n\nEvery key of the file is documented in the courier-broker crate (config module)."
)]
pub struct ServeArgs {
    /// A TOML configuration file (keys: listen, data_dir, metrics, fsync, ...).
    #[arg(long, env = "COURIER_CONFIG")]
    config: Option<PathBuf>,
    /// An address to serve on (repeat for several): tcp://HOST:PORT or unix://PATH.
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
    /// Log level: error, warn, info, debug or trace.
    #[arg(long, env = "COURIER_LOG")]
    log: Option<String>,
    /// Certificate chain (PEM) for tls:// listen addresses.
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

fn level(name: &str) -> anyhow::Result<tracing::Level> {
    name.parse().map_err(|_| {
        Failure::usage(format!(
            "{name:?} is not a log level (error, warn, info, debug or trace)"
        ))
        .into()
    })
}

/// The configuration the arguments describe.
fn config(args: ServeArgs) -> anyhow::Result<BrokerConfig> {
    let mut config = match &args.config {
        Some(path) => BrokerConfig::load(path).map_err(Failure::usage)?,
        None => BrokerConfig::default(),
    };
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
    Ok(config)
}

pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let config = config(args)?;
    tracing_subscriber::fmt()
        .with_max_level(level(&config.log)?)
        .with_writer(std::io::stderr)
        .init();
    // Flag and file mistakes are usage errors (exit 2), found before binding.
    config.addresses().map_err(Failure::usage)?;
    config.metrics_address().map_err(Failure::usage)?;
    let broker = Broker::start(config.clone())
        .await
        .context("cannot start the broker")?;
    // One line per address on stdout, so scripts (and tests) can find a
    // port chosen with :0.
    for address in broker.addresses() {
        println!("listening {address}");
    }
    if let Some(metrics) = broker.metrics_address() {
        println!("metrics http://{metrics}/metrics");
    }
    println!("data {}", config.data_dir.display());

    wait_for_signal().await?;
    tracing::info!("shutting down (a second signal exits at once)");
    tokio::spawn(async {
        if wait_for_signal().await.is_ok() {
            eprintln!("courier: second signal, exiting now");
            std::process::exit(130);
        }
    });
    broker.shutdown().await;
    Ok(())
}

#[cfg(unix)]
async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut interrupt = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let mut terminate = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    tokio::select! {
        _ = interrupt.recv() => {}
        _ = terminate.recv() => {}
    }
    Ok(())
}

#[cfg(not(unix))]
async fn wait_for_signal() -> anyhow::Result<()> {
    tokio::signal::ctrl_c()
        .await
        .context("cannot handle Ctrl-C")
}
