//! `courier-example-web`: a small issue tracker built on Courier, to show a
//! web application's whole flow across processes.
//!
//! ```text
//! browser ──HTTP──▶ gateway ──request svc.tickets──▶ service (×N, one queue group) ──▶ SQLite
//!    ▲                 │                                                                ▲
//!    │                 └──enqueue tickets.writes (durable)──▶ worker ──INSERT OR IGNORE─┘
//!    │                                                          │
//!    └──────WebSocket (broker)◀──publish tickets.changed────────┘
//! ```
//!
//! One binary, three roles (`gateway`, `service`, `worker`); see the
//! README next to this crate.

mod db;
mod gateway;
mod model;
mod service;
mod worker;

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use courier_pubsub::remote::Address;

use crate::db::DatabaseUrl;

/// Courier's web example: an issue tracker across processes.
#[derive(Debug, Parser)]
#[command(name = "courier-example-web", version)]
struct Cli {
    /// Log level on stderr: error, warn, info, debug or trace.
    #[arg(long, global = true, env = "COURIER_LOG", default_value = "info")]
    log: tracing::Level,
    /// Shut down (as on SIGTERM) when stdin reaches end of file: a parent
    /// that holds this process's stdin as a pipe stops it just by exiting,
    /// even when killed with SIGKILL (used by `cargo xtask demo web` and
    /// the browser tests, so nothing outlives them holding ports).
    #[arg(long, global = true)]
    exit_with_parent: bool,
    #[command(subcommand)]
    role: Role,
}

#[derive(Debug, Subcommand)]
enum Role {
    /// The HTTP server: serves the page and the JSON API, reads through
    /// svc.tickets, writes through the tickets.writes queue.
    Gateway {
        /// The broker's Courier address.
        #[arg(long, env = "COURIER_URL", default_value = "tcp://127.0.0.1:7878")]
        broker: Address,
        /// The broker's WebSocket address, which the page connects to for
        /// live updates (told to it by /api/config).
        #[arg(long, default_value = "ws://127.0.0.1:7880")]
        ws_url: String,
        /// Where to serve HTTP (port 0: any free port; the line printed
        /// on stdout says which).
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        /// How long one read waits for the service, in milliseconds
        /// (a read that times out is tried once more).
        #[arg(long, default_value_t = gateway::DEFAULT_REQUEST_TIMEOUT.as_millis() as u64)]
        request_timeout_ms: u64,
        /// HTTP connections served at once; more are closed on accept.
        #[arg(long, default_value_t = gateway::DEFAULT_MAX_CONNECTIONS)]
        max_connections: usize,
        /// How long a client has to send a request's head (headers), in
        /// milliseconds, before its connection is closed.
        #[arg(long, default_value_t = gateway::DEFAULT_HEADER_TIMEOUT.as_millis() as u64)]
        header_timeout_ms: u64,
    },
    /// One instance of the ticket service: answers svc.tickets from the
    /// database, sharing the requests with the other instances.
    Service {
        /// The broker's Courier address.
        #[arg(long, env = "COURIER_URL", default_value = "tcp://127.0.0.1:7878")]
        broker: Address,
        /// The database: sqlite:///absolute/path.db or sqlite:relative.db.
        #[arg(long, env = "DATABASE_URL")]
        database: String,
    },
    /// The writer: takes tickets from the tickets.writes queue, stores
    /// them, announces them on tickets.changed.
    Worker {
        /// The broker's Courier address.
        #[arg(long, env = "COURIER_URL", default_value = "tcp://127.0.0.1:7878")]
        broker: Address,
        /// The database: sqlite:///absolute/path.db or sqlite:relative.db.
        #[arg(long, env = "DATABASE_URL")]
        database: String,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_max_level(cli.log)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    runtime.block_on(async move {
        // Installed before anything is ready, so a signal sent the moment
        // a ready line appears is not lost.
        let shutdown = Shutdown::install(cli.exit_with_parent)?;
        match cli.role {
            Role::Gateway {
                broker,
                ws_url,
                listen,
                request_timeout_ms,
                max_connections,
                header_timeout_ms,
            } => {
                let config = gateway::GatewayConfig {
                    broker,
                    ws_url,
                    listen,
                    request_timeout: Duration::from_millis(request_timeout_ms.max(1)),
                    max_connections: max_connections.max(1),
                    header_timeout: Duration::from_millis(header_timeout_ms.max(1)),
                };
                gateway::run(config, shutdown).await
            }
            Role::Service { broker, database } => {
                service::run(broker, parse_database(&database)?, shutdown).await
            }
            Role::Worker { broker, database } => {
                worker::run(broker, parse_database(&database)?, shutdown).await
            }
        }
    })?;
    // Tasks still running (connections' drivers) are dropped with the
    // runtime; nothing is left to flush by then.
    runtime.shutdown_timeout(Duration::from_secs(1));
    Ok(())
}

/// The service's and worker's database: a file, never `sqlite::memory:`,
/// which would give each process a private database of its own (the
/// worker's writes would never show in the service's reads).
fn parse_database(url: &str) -> anyhow::Result<DatabaseUrl> {
    match url.parse::<DatabaseUrl>()? {
        DatabaseUrl::SqliteMemory => anyhow::bail!(
            "{url:?} is a private in-memory database per process: the service and the worker \
             must share one file (e.g. sqlite:///tmp/tickets.db)"
        ),
        file => Ok(file),
    }
}

/// SIGINT, SIGTERM or (with `--exit-with-parent`) stdin's end, whichever
/// comes first.
#[derive(Debug)]
pub struct Shutdown {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
    /// Becomes `true` when stdin ends; never, without the flag.
    parent_gone: tokio::sync::watch::Receiver<bool>,
    /// Without the flag, the sender, held so the channel never closes
    /// (a closed channel would end `wait` at once).
    _never: Option<tokio::sync::watch::Sender<bool>>,
}

impl Shutdown {
    fn install(exit_with_parent: bool) -> anyhow::Result<Shutdown> {
        use tokio::signal::unix::{signal, SignalKind};
        let (gone, parent_gone) = tokio::sync::watch::channel(false);
        let mut never = None;
        if exit_with_parent {
            // A plain thread: stdin is read blocking, and whatever the
            // parent writes is ignored (read in small chunks, so nothing
            // is kept).
            std::thread::Builder::new()
                .name("parent-watch".into())
                .spawn(move || {
                    watch_stdin(std::io::stdin().lock());
                    let _ = gone.send(true);
                })
                .context("cannot watch stdin")?;
        } else {
            never = Some(gone);
        }
        Ok(Shutdown {
            interrupt: signal(SignalKind::interrupt()).context("cannot handle SIGINT")?,
            terminate: signal(SignalKind::terminate()).context("cannot handle SIGTERM")?,
            parent_gone,
            _never: never,
        })
    }

    /// Waits for the signal.
    pub async fn wait(&mut self) {
        tokio::select! {
            _ = self.interrupt.recv() => tracing::info!("SIGINT: shutting down"),
            _ = self.terminate.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = self.parent_gone.wait_for(|gone| *gone) => {
                tracing::info!("stdin closed (the parent is gone): shutting down");
            }
        }
    }
}

/// Reads `input` until its end (or an error, which means the same: no one
/// holds the other end usefully any more).
fn watch_stdin(mut input: impl std::io::Read) {
    let mut chunk = [0u8; 256];
    loop {
        match input.read(&mut chunk) {
            Ok(0) => return,
            Ok(_) => {}
            Err(err) if err.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

/// Prints a ready line on stdout at once (tests and `cargo xtask demo
/// web` wait for it; stdout may be a pipe, which would buffer it).
fn announce(line: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Milliseconds since the Unix epoch.
fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watching_stdin_returns_at_its_end() {
        watch_stdin(&b"anything the parent writes"[..]);
        let cli = Cli::try_parse_from([
            "x",
            "worker",
            "--database",
            "sqlite:t.db",
            "--exit-with-parent",
        ])
        .unwrap();
        assert!(cli.exit_with_parent);
    }

    #[test]
    fn roles_parse_with_their_defaults() {
        let cli =
            Cli::try_parse_from(["x", "service", "--database", "sqlite:///tmp/t.db"]).unwrap();
        let Role::Service { broker, database } = cli.role else {
            panic!("not a service");
        };
        assert_eq!(broker.to_string(), "tcp://127.0.0.1:7878");
        assert!(parse_database(&database).is_ok());
        assert!(parse_database("mysql://x").is_err());
        let memory = parse_database("sqlite::memory:").unwrap_err();
        assert!(memory.to_string().contains("share one file"), "{memory}");
        let cli = Cli::try_parse_from(["x", "gateway", "--listen", "127.0.0.1:0"]).unwrap();
        assert!(matches!(cli.role, Role::Gateway { listen, .. } if listen.port() == 0));
    }
}
