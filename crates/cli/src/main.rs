//! `courier`: run a broker, publish, subscribe, send requests, use queues,
//! benchmark a broker and watch a demonstration of everything.
//!
//! Exit codes scripts can rely on:
//!
//! | code | meaning |
//! |---|---|
//! | 0 | done |
//! | 1 | failed (the broker refused, storage failed, ...) |
//! | 2 | bad usage or bad input (unknown flag, invalid subject, bad config, no such queue) |
//! | 3 | the broker cannot be reached |
//! | 4 | nothing arrived in time (no reply, no responders, empty queue, `sub --timeout` passed) |
//! | 5 | refused: not authenticated, or not permitted |
//!
//! Errors from Courier's crates get their code from their `kind()` (see
//! [`code_for`]), so the same kind of failure exits the same way whatever
//! mechanism reported it.

mod bench;
mod cert;
mod client;
mod demo;
mod kv;
mod serve;
mod soak;

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use courier_transport::ErrorKind;

/// Where clients find the broker unless told otherwise.
pub const DEFAULT_URL: &str = "tcp://127.0.0.1:7878";

#[derive(Parser, Debug)]
#[command(
    name = "courier",
    version,
    about = "Courier: message passing, RPC, queues and pub/sub over one wire format",
    after_help = "Examples:\n  courier serve                          # a broker on tcp://127.0.0.1:7878\n  courier sub 'orders.>'                 # print everything under orders.\n  courier pub orders.eu.created 'tea'    # publish one message\n  courier queue push jobs 'resize 1.png' # store a job\n  courier queue pop jobs                 # take it (and acknowledge it)\n  courier demo                           # see all five mechanisms at work"
)]
struct Cli {
    /// The broker's address, or the addresses of a cluster's brokers
    /// separated by commas (tcp://10.0.0.1:7878,tcp://10.0.0.2:7878): the
    /// client connects to the first that answers and moves to another when
    /// it goes away.
    #[arg(long, global = true, env = "COURIER_URL", default_value = DEFAULT_URL)]
    url: String,
    /// Print JSON (one object per line) instead of text.
    #[arg(long, global = true)]
    json: bool,
    /// Bearer token for brokers that require one (never printed).
    #[arg(long, global = true, env = "COURIER_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// CA certificate (PEM) to trust for tls:// brokers.
    #[arg(long, global = true, env = "COURIER_TLS_CA")]
    tls_ca: Option<std::path::PathBuf>,
    /// Client certificate (PEM) for brokers that require one (mutual TLS).
    #[arg(long, global = true, env = "COURIER_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<std::path::PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, global = true, env = "COURIER_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<std::path::PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a broker.
    Serve(Box<serve::ServeArgs>),
    /// Publish to a subject: DATA, or stdin (one message per line with --lines).
    #[command(
        name = "pub",
        after_help = "Examples:\n  courier pub orders.eu.created '{\"id\": 1}'\n  seq 1 1000 | courier pub numbers --lines"
    )]
    Publish(client::PublishArgs),
    /// Print messages on subjects matching FILTER (`*` one token, `>` the rest).
    #[command(
        name = "sub",
        after_help = "Examples:\n  courier sub 'orders.*.created'\n  courier sub jobs --group workers --count 10\n  courier sub alerts --timeout 30s        # exit code 4 if none comes in 30 s\n  courier sub jobs --count 5 --timeout 2s # at most 2 s of silence before each"
    )]
    Subscribe(client::SubscribeArgs),
    /// Send a request to SUBJECT and print the first reply.
    #[command(
        after_help = "Examples:\n  courier request svc.upper 'hello' --timeout 2s\n  date | courier request svc.log          # the request from stdin\n  courier --json request svc.upper hi     # the reply with its subject"
    )]
    Request(client::RequestArgs),
    /// Serve SUBJECT from the shell: answer each request with DATA, or with
    /// what COMMAND prints given the request on its stdin.
    #[command(
        after_help = "Examples:\n  courier reply svc.time --command date\n  courier reply svc.upper --command 'tr a-z A-Z' --group upper\n  courier reply svc.ping pong --count 1"
    )]
    Reply(client::ReplyArgs),
    /// Use durable queues.
    #[command(
        subcommand,
        after_help = "Examples:\n  courier queue push jobs 'resize 1.png'\n  courier queue pop jobs --count 10\n  courier queue peek jobs\n  courier queue stats jobs\n  courier queue list"
    )]
    Queue(client::QueueCommand),
    /// Show the broker's counters.
    #[command(after_help = "Examples:\n  courier stats\n  courier --json stats | jq .published")]
    Stats,
    /// Use a cluster's replicated key-value store (shared state).
    #[command(
        subcommand,
        after_help = "Examples:\n  courier kv put config/color blue\n  courier kv get config/color\n  courier kv watch config/"
    )]
    Kv(kv::KvCommand),
    /// See and change a cluster's membership.
    #[command(
        subcommand,
        after_help = "Examples:\n  courier cluster status\n  courier cluster add-node 4 tcp://10.0.0.4:7878\n  courier cluster remove-node 4"
    )]
    Cluster(kv::ClusterCommand),
    /// Measure a broker: pub/sub throughput and fan-out, request-reply
    /// latency, durable queue throughput.
    Bench(bench::BenchArgs),
    /// Start a broker and worker processes on loopback and exercise all
    /// five mechanisms, then print what happened.
    #[command(
        after_help = "Examples:\n  courier demo\n  courier demo --count 300   # a quicker run"
    )]
    Demo(demo::DemoArgs),
    /// Development certificates for trying TLS.
    #[command(
        subcommand,
        after_help = "Examples:\n  courier cert generate --dir certs\n  courier cert generate --dir certs --client alice --name broker.local"
    )]
    Cert(cert::CertCommand),
    /// A mixed workload over a broker process with faults injected from a
    /// seed, checked throughout (what `cargo xtask soak` runs).
    #[command(
        hide = true,
        after_help = "Examples:\n  courier soak --minutes 1\n  courier soak --minutes 30 --seed 42"
    )]
    Soak(soak::SoakArgs),
    /// A demo worker process (used by `courier demo`).
    #[command(hide = true)]
    Worker(demo::WorkerArgs),
}

/// An error with the exit code it should end the process with.
#[derive(Debug)]
pub struct Failure {
    code: u8,
    message: String,
}

impl Failure {
    /// Bad usage or input.
    pub fn usage(message: impl std::fmt::Display) -> Failure {
        Failure {
            code: 2,
            message: message.to_string(),
        }
    }

    /// Any exit code with its message.
    pub fn with_code(code: u8, message: impl std::fmt::Display) -> Failure {
        Failure {
            code,
            message: message.to_string(),
        }
    }

    /// Nothing arrived in time.
    pub fn nothing(message: impl std::fmt::Display) -> Failure {
        Failure {
            code: 4,
            message: message.to_string(),
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Failure {}

/// The exit code for each kind of failure: the table in the crate docs.
/// Every error the commands return is mapped through its `kind()`, so a
/// permission denial exits 5 whether RPC, a queue, pub/sub or the cluster
/// refused.
pub fn code_for(kind: ErrorKind) -> u8 {
    match kind {
        ErrorKind::InvalidInput | ErrorKind::NotFound | ErrorKind::LimitExceeded => 2,
        ErrorKind::Unavailable => 3,
        ErrorKind::TimedOut => 4,
        ErrorKind::Refused => 5,
        // Busy, Conflict, Unsupported, Internal, and kinds added later:
        // a failure.
        _ => 1,
    }
}

/// The kind of an error from any of Courier's crates, if it is one.
fn error_kind(err: &anyhow::Error) -> Option<ErrorKind> {
    use courier_cluster::client::KvClientError;
    use courier_cluster::node::ClusterError;
    use courier_pubsub::remote::RemotePubSubError;
    use courier_queue::remote::RemoteQueueError;
    use courier_rpc::RpcError;
    if let Some(err) = err.downcast_ref::<RpcError>() {
        return Some(err.kind());
    }
    if let Some(err) = err.downcast_ref::<RemotePubSubError>() {
        return Some(err.kind());
    }
    if let Some(err) = err.downcast_ref::<RemoteQueueError>() {
        return Some(err.kind());
    }
    if let Some(err) = err.downcast_ref::<KvClientError>() {
        return Some(err.kind());
    }
    if let Some(err) = err.downcast_ref::<ClusterError>() {
        return Some(err.kind());
    }
    None
}

/// The exit code for an error: a [`Failure`]'s own, else that of its kind,
/// else 1.
fn exit_code(err: &anyhow::Error) -> u8 {
    if let Some(failure) = err.downcast_ref::<Failure>() {
        return failure.code;
    }
    error_kind(err).map_or(1, code_for)
}

/// Parses `500ms`, `2s`, `1m` or a plain number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(at) => text.split_at(at),
        None => (text, "s"),
    };
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration (try 500ms, 2s or 1m)"))?;
    let seconds = match unit {
        "ms" => value / 1000.0,
        "s" => value,
        "m" => value * 60.0,
        _ => return Err(format!("{text:?}: unknown unit {unit:?} (use ms, s or m)")),
    };
    Duration::try_from_secs_f64(seconds).map_err(|err| format!("{text:?}: {err}"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("courier: error: cannot start a runtime: {err}");
            return ExitCode::from(1);
        }
    };
    let url = cli.url.clone();
    let json = cli.json;
    let security = client::Security {
        token: cli.token.clone(),
        tls_ca: cli.tls_ca.clone(),
        tls_identity: cli.tls_cert.clone().zip(cli.tls_key.clone()),
    };
    if let Err(err) = client::set_security(security) {
        eprintln!("courier: error: {err:#}");
        return ExitCode::from(exit_code(&err));
    }
    let outcome = runtime.block_on(async move {
        match cli.command {
            Command::Serve(args) => serve::run(*args).await,
            Command::Publish(args) => client::publish(&url, args).await,
            Command::Subscribe(args) => client::subscribe(&url, json, args).await,
            Command::Request(args) => client::request(&url, json, args).await,
            Command::Reply(args) => client::reply(&url, args).await,
            Command::Queue(command) => client::queue(&url, json, command).await,
            Command::Stats => client::stats(&url, json).await,
            Command::Kv(command) => kv::kv(&url, json, command).await,
            Command::Cluster(command) => kv::cluster(&url, json, command).await,
            Command::Bench(args) => bench::run(&url, json, args).await,
            Command::Demo(args) => demo::run(args).await,
            Command::Cert(command) => cert::run(command),
            Command::Worker(args) => demo::worker(&url, args).await,
            Command::Soak(args) => soak::run(args).await,
        }
    });
    // Streams and subscriptions may still be open: do not wait for them.
    runtime.shutdown_background();
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // One line, the causes joined: no backtrace.
            eprintln!("courier: error: {err:#}");
            ExitCode::from(exit_code(&err))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_as_people_write_them() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("5h").unwrap_err().contains("unknown unit"));
    }

    #[test]
    fn every_command_has_examples_in_its_help() {
        use clap::CommandFactory;
        fn walk(command: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for sub in command.get_subcommands() {
                if sub.is_hide_set() || sub.get_name() == "help" {
                    continue;
                }
                let path = format!("{path} {}", sub.get_name());
                let help = sub
                    .get_after_help()
                    .map(|h| h.to_string())
                    .unwrap_or_default();
                // The heading, then at least one command line under it.
                let filled = help.split_once("Examples:").is_some_and(|(_, rest)| {
                    rest.lines().any(|line| line.starts_with("  courier "))
                });
                if !filled {
                    missing.push(path.clone());
                }
                walk(sub, &path, missing);
            }
        }
        let mut missing = Vec::new();
        walk(&Cli::command(), "courier", &mut missing);
        assert!(missing.is_empty(), "no Examples: section in {missing:?}");
    }

    #[test]
    fn kinds_map_to_the_documented_exit_codes() {
        assert_eq!(code_for(ErrorKind::Internal), 1);
        assert_eq!(code_for(ErrorKind::Busy), 1);
        assert_eq!(code_for(ErrorKind::Conflict), 1);
        assert_eq!(code_for(ErrorKind::Unsupported), 1);
        assert_eq!(code_for(ErrorKind::InvalidInput), 2);
        assert_eq!(code_for(ErrorKind::NotFound), 2);
        assert_eq!(code_for(ErrorKind::LimitExceeded), 2);
        assert_eq!(code_for(ErrorKind::Unavailable), 3);
        assert_eq!(code_for(ErrorKind::TimedOut), 4);
        assert_eq!(code_for(ErrorKind::Refused), 5);
    }

    #[test]
    fn every_mechanism_s_errors_exit_by_their_kind() {
        use courier_cluster::client::KvClientError;
        use courier_cluster::node::ClusterError;
        use courier_pubsub::remote::{RemoteError as PubSubError, RemotePubSubError};
        use courier_queue::remote::{RemoteError as QueueError, RemoteQueueError};
        use courier_rpc::RpcError;
        let code = |err: anyhow::Error| exit_code(&err);
        // A permission denial exits 5 whatever refused it.
        assert_eq!(code(RpcError::PermissionDenied("x".into()).into()), 5);
        assert_eq!(code(RpcError::Unauthenticated("x".into()).into()), 5);
        let queue = RemoteQueueError::Queue(QueueError::PermissionDenied("x".into()));
        assert_eq!(code(queue.into()), 5);
        let pubsub = RemotePubSubError::Remote(PubSubError::PermissionDenied("x".into()));
        assert_eq!(code(pubsub.into()), 5);
        assert_eq!(code(ClusterError::PermissionDenied("x".into()).into()), 5);
        let kv = KvClientError::Cluster(ClusterError::PermissionDenied("x".into()));
        assert_eq!(code(kv.into()), 5);
        // The codes the downcasts gave before kind() are kept.
        assert_eq!(code(RpcError::Unavailable("refused".into()).into()), 3);
        assert_eq!(code(RpcError::DeadlineExceeded.into()), 4);
        assert_eq!(code(RpcError::TooLarge { size: 2, limit: 1 }.into()), 2);
        assert_eq!(code(RpcError::Internal("panic".into()).into()), 1);
        let missing = RemoteQueueError::Queue(QueueError::NotFound("jobs".into()));
        assert_eq!(code(missing.into()), 2);
        let unknown = RemoteQueueError::Queue(QueueError::UnknownDelivery);
        assert_eq!(code(unknown.into()), 1);
        let no_one = RemotePubSubError::NoResponders("a".into());
        assert_eq!(code(no_one.into()), 4);
        let late = RemotePubSubError::Timeout(Duration::from_secs(1));
        assert_eq!(code(late.into()), 4);
        let invalid = RemotePubSubError::Remote(PubSubError::Invalid("a..b".into()));
        assert_eq!(code(invalid.into()), 2);
        let down = RemotePubSubError::Rpc(RpcError::Unavailable("refused".into()));
        assert_eq!(code(down.into()), 3);
        // Context does not hide the kind; a Failure keeps its own code.
        let wrapped = anyhow::Error::from(RpcError::PermissionDenied("x".into())).context("pub");
        assert_eq!(code(wrapped), 5);
        assert_eq!(code(Failure::nothing("empty").into()), 4);
        assert_eq!(code(anyhow::anyhow!("something else")), 1);
    }

    #[test]
    fn the_command_line_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
