//! The client commands: pub, sub, request, queue, stats.

use std::io::{BufRead, Write};
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use clap::{Args, Subcommand};
use courier_broker::{BrokerServiceClient, BrokerStats};
use courier_pubsub::remote::RemotePubSub;
use courier_pubsub::{Event, Message, SubscribeOptions};
use courier_queue::remote::RemoteQueue;
use courier_rpc::{Client, ClientConfig};
use courier_transport::Address;

use crate::Failure;

/// How many lines `--lines` sends per call.
const LINES_PER_BATCH: usize = 256;

/// The brokers `--url` names: one address, or the nodes of a cluster
/// separated by commas.
fn addresses(url: &str) -> anyhow::Result<Vec<Address>> {
    Address::parse_list(url).map_err(|err| Failure::usage(format!("--url {url:?}: {err}")).into())
}

/// Credentials from the global flags, for every connection this process makes.
#[derive(Debug, Default)]
pub struct Security {
    pub token: Option<String>,
    pub tls_ca: Option<std::path::PathBuf>,
    pub tls_identity: Option<(std::path::PathBuf, std::path::PathBuf)>,
}

static CLIENT_CONFIG: std::sync::OnceLock<ClientConfig> = std::sync::OnceLock::new();

/// Builds the client configuration once, from the global flags.
pub fn set_security(security: Security) -> anyhow::Result<()> {
    let mut config = ClientConfig::default();
    config.token = security.token.map(courier_rpc::Secret::new);
    if let Some(ca) = &security.tls_ca {
        let tls = match &security.tls_identity {
            Some((cert, key)) => courier_transport::TlsClient::with_identity(ca, cert, key),
            None => courier_transport::TlsClient::trusting(ca),
        }
        .map_err(Failure::usage)?;
        config.transport = config.transport.with_tls_client(tls);
    }
    let _ = CLIENT_CONFIG.set(config);
    Ok(())
}

pub(crate) fn client_config() -> ClientConfig {
    CLIENT_CONFIG.get().cloned().unwrap_or_default()
}

/// Connects to the first broker of `url` that answers (the client moves to
/// another of them by itself if that one goes away), or fails with exit code
/// 3 and the addresses in the message.
pub async fn connect(url: &str) -> anyhow::Result<Client> {
    let addresses = addresses(url)?;
    match Client::connect_any(&addresses, client_config()).await {
        Ok(client) => Ok(client),
        // Refused credentials are not an unreachable broker.
        Err(
            err @ (courier_rpc::RpcError::Unauthenticated(_)
            | courier_rpc::RpcError::TooManyConnections { .. }),
        ) => Err(err.into()),
        Err(err) => Err(anyhow::Error::from(err).context(format!(
            "cannot reach the broker at {url} (is `courier serve` running?)"
        ))),
    }
}

/// Text as given, or bytes from stdin.
fn data_or_stdin(data: Option<String>) -> anyhow::Result<Bytes> {
    match data {
        Some(data) => Ok(Bytes::from(data)),
        None => {
            let mut buffer = Vec::new();
            std::io::Read::read_to_end(&mut std::io::stdin(), &mut buffer)
                .context("cannot read stdin")?;
            Ok(Bytes::from(buffer))
        }
    }
}

/// Calls `send` with batches of stdin's lines; returns how many were sent.
async fn each_line_batch<F, Fut>(mut send: F) -> anyhow::Result<u64>
where
    F: FnMut(Vec<Bytes>) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    let mut sent = 0u64;
    loop {
        let mut batch = Vec::with_capacity(LINES_PER_BATCH);
        for line in lines.by_ref().take(LINES_PER_BATCH) {
            batch.push(Bytes::from(line.context("cannot read stdin")?));
        }
        if batch.is_empty() {
            return Ok(sent);
        }
        sent += batch.len() as u64;
        send(batch).await?;
    }
}

#[derive(Args, Debug)]
pub struct PublishArgs {
    /// The subject, e.g. orders.eu.created.
    subject: String,
    /// The message; stdin if absent.
    data: Option<String>,
    /// Each line of stdin is one message.
    #[arg(long, conflicts_with = "data")]
    lines: bool,
}

pub async fn publish(url: &str, args: PublishArgs) -> anyhow::Result<()> {
    courier_pubsub::Subject::new(&args.subject).map_err(Failure::usage)?;
    let publisher = RemotePubSub::with_client(connect(url).await?).publisher();
    if args.lines {
        let subject = args.subject.clone();
        let sent = each_line_batch(|batch| {
            let (publisher, subject) = (publisher.clone(), subject.clone());
            async move {
                publisher
                    .publish_batch(batch.into_iter().map(|line| (subject.clone(), line)))
                    .await?;
                Ok(())
            }
        })
        .await?;
        // One way: what the broker refused is known once it has them all.
        publisher.flush().await?;
        eprintln!("published {sent} messages to {}", args.subject);
    } else {
        // One message: confirmed, so the count of live subscribers can be
        // shown (many use the batched path above).
        let delivered = publisher
            .publish_confirmed(&args.subject, data_or_stdin(args.data)?)
            .await?;
        eprintln!(
            "published to {} ({delivered} live subscribers)",
            args.subject
        );
    }
    Ok(())
}

#[derive(Args, Debug)]
pub struct SubscribeArgs {
    /// Subjects to follow: `*` matches one token, `>` the rest.
    filter: String,
    /// Share messages with other subscribers of this queue group.
    #[arg(long)]
    group: Option<String>,
    /// Exit after this many messages.
    #[arg(long)]
    count: Option<u64>,
    /// Exit with code 4 if no message arrives within this long, e.g. 2s:
    /// the clock starts once subscribed and starts again at each message,
    /// so with --count it bounds the wait for each next one, not the total
    /// (gap and reconnect notices do not restart it). What arrived before
    /// stays printed.
    #[arg(long, value_parser = crate::parse_duration)]
    timeout: Option<Duration>,
    /// Messages buffered at the broker before the oldest are dropped.
    #[arg(long, default_value_t = 4096)]
    buffer: usize,
}

fn print_message(json: bool, message: &Message) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    if json {
        let line = serde_json::json!({
            "subject": message.subject.as_str(),
            "data": String::from_utf8_lossy(&message.payload),
            "publisher": message.publisher,
            "seq": message.seq,
            "reply_to": message.reply_to.as_ref().map(|r| r.as_str()),
        });
        writeln!(out, "{line}")?;
    } else {
        writeln!(
            out,
            "{}: {}",
            message.subject.as_str(),
            String::from_utf8_lossy(&message.payload)
        )?;
    }
    out.flush()?;
    Ok(())
}

pub async fn subscribe(url: &str, json: bool, args: SubscribeArgs) -> anyhow::Result<()> {
    courier_pubsub::Filter::new(&args.filter).map_err(Failure::usage)?;
    let bus = RemotePubSub::with_client(connect(url).await?);
    let mut options = SubscribeOptions::default().buffer(args.buffer.max(1));
    if let Some(group) = args.group {
        options = options.group(group);
    }
    let mut subscription = bus.subscribe(&args.filter, options).await?;
    eprintln!("subscribed to {}", args.filter);
    let mut seen = 0u64;
    let mut deadline = args.timeout.map(|t| tokio::time::Instant::now() + t);
    while args.count.is_none_or(|count| seen < count) {
        let next = match deadline {
            Some(at) => match tokio::time::timeout_at(at, subscription.recv()).await {
                Ok(next) => next,
                Err(_) => {
                    let waited = args.timeout.unwrap_or_default();
                    let what = if seen == 0 {
                        "no message"
                    } else {
                        "no further message"
                    };
                    return Err(Failure::nothing(format!(
                        "{what} on {} within {waited:?} ({seen} received)",
                        args.filter
                    ))
                    .into());
                }
            },
            None => subscription.recv().await,
        };
        match next {
            Some(Ok(Event::Message(message))) => {
                print_message(json, &message)?;
                seen += 1;
                deadline = args.timeout.map(|t| tokio::time::Instant::now() + t);
            }
            Some(Ok(Event::Gap {
                publisher,
                from,
                to,
            })) => eprintln!(
                "missed {} messages from publisher {publisher} (slow consumer)",
                to - from
            ),
            Some(Ok(Event::Dropped { count })) => {
                eprintln!("missed {count} messages (slow consumer)")
            }
            Some(Ok(Event::Restored)) => {
                eprintln!("reconnected; messages published meanwhile were missed")
            }
            Some(Ok(_)) => {}
            Some(Err(err)) => return Err(err.into()),
            None => anyhow::bail!("the broker ended the subscription"),
        }
    }
    Ok(())
}

#[derive(Args, Debug)]
pub struct RequestArgs {
    /// The service's subject, e.g. svc.billing.
    subject: String,
    /// The request; stdin if absent.
    data: Option<String>,
    /// How long to wait for the reply.
    #[arg(long, default_value = "5s", value_parser = crate::parse_duration)]
    timeout: Duration,
}

pub async fn request(url: &str, json: bool, args: RequestArgs) -> anyhow::Result<()> {
    courier_pubsub::Subject::new(&args.subject).map_err(Failure::usage)?;
    let bus = RemotePubSub::with_client(connect(url).await?);
    let reply = bus
        .request(&args.subject, data_or_stdin(args.data)?, args.timeout)
        .await?;
    if json {
        print_message(true, &reply)
    } else {
        let mut out = std::io::stdout().lock();
        out.write_all(&reply.payload)?;
        out.write_all(b"\n")?;
        Ok(())
    }
}

#[derive(Args, Debug)]
pub struct ReplyArgs {
    /// The subject to serve, e.g. svc.upper.
    subject: String,
    /// The answer to every request (unless --command is given).
    #[arg(required_unless_present = "command", conflicts_with = "command")]
    data: Option<String>,
    /// Run this through `sh -c` for each request, with the request on its
    /// stdin; what it prints is the reply (a failing command's stderr is
    /// logged and nothing is sent back, so the requester times out).
    #[arg(long)]
    command: Option<String>,
    /// The queue group repliers share requests in (several `courier reply`
    /// with the same group take turns).
    #[arg(long, default_value = "courier-reply")]
    group: String,
    /// Exit after answering this many requests.
    #[arg(long)]
    count: Option<u64>,
}

pub async fn reply(url: &str, args: ReplyArgs) -> anyhow::Result<()> {
    courier_pubsub::Subject::new(&args.subject).map_err(Failure::usage)?;
    let bus = RemotePubSub::with_client(connect(url).await?);
    let options = SubscribeOptions::default().group(args.group.clone());
    let mut requests = bus.subscribe(&args.subject, options).await?;
    let responder = bus.publisher();
    eprintln!("serving {} in group {}", args.subject, args.group);
    let mut answered = 0u64;
    while args.count.is_none_or(|count| answered < count) {
        let request = match requests.recv().await {
            Some(Ok(Event::Message(request))) => request,
            Some(Ok(_)) => continue,
            Some(Err(err)) => return Err(err.into()),
            None => anyhow::bail!("the broker ended the subscription"),
        };
        if request.reply_to.is_none() {
            continue; // a plain publish: nobody waits for an answer
        }
        let answer = match (&args.command, &args.data) {
            (Some(command), _) => match run_for_reply(command, &request.payload).await {
                Ok(output) => output,
                Err(err) => {
                    eprintln!("courier: {command:?} failed: {err:#}");
                    continue;
                }
            },
            (None, Some(data)) => Bytes::from(data.clone()),
            (None, None) => Bytes::new(),
        };
        responder.reply(&request, answer).await?;
        // Replies travel one way: flushed, so one refused is reported and
        // the last is not lost when `--count` ends the process.
        responder.flush().await?;
        answered += 1;
    }
    Ok(())
}

/// Runs `command` with `input` on its stdin; its stdout if it succeeds.
async fn run_for_reply(command: &str, input: &[u8]) -> anyhow::Result<Bytes> {
    use tokio::io::AsyncWriteExt;
    let mut child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(command)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("cannot start sh")?;
    let mut stdin = child.stdin.take().context("no stdin")?;
    let input = input.to_vec();
    // Written beside the wait, so a command that prints a lot before it
    // reads cannot deadlock against us.
    let writer = tokio::spawn(async move {
        let _ = stdin.write_all(&input).await;
    });
    let output = child.wait_with_output().await.context("waiting for it")?;
    let _ = writer.await;
    if !output.status.success() {
        anyhow::bail!(
            "{}: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(Bytes::from(output.stdout))
}

#[derive(Subcommand, Debug)]
pub enum QueueCommand {
    /// Store a message: DATA, or stdin (one message per line with --lines).
    #[command(
        after_help = "Examples:\n  courier queue push jobs 'resize 1.png'\n  ls *.png | courier queue push jobs --lines"
    )]
    Push {
        /// The queue (created on first use).
        queue: String,
        /// The message; stdin if absent.
        data: Option<String>,
        /// Each line of stdin is one message.
        #[arg(long, conflicts_with = "data")]
        lines: bool,
        /// An idempotency key: a second push with the same key stores nothing.
        #[arg(long)]
        key: Option<String>,
    },
    /// Take messages, print them and acknowledge each once printed.
    #[command(
        after_help = "Examples:\n  courier queue pop jobs\n  courier queue pop jobs --count 10 --wait 30s\n  courier queue pop jobs --requeue   # look without taking"
    )]
    Pop {
        /// The queue.
        queue: String,
        /// How many to take.
        #[arg(long, default_value_t = 1)]
        count: u64,
        /// How long to wait for each message (exit code 4 if none comes).
        #[arg(long, default_value = "1s", value_parser = crate::parse_duration)]
        wait: Duration,
        /// Give each message back instead of acknowledging it.
        #[arg(long)]
        requeue: bool,
    },
    /// Acknowledge messages by id: pop them with --requeue first to look.
    /// Takes deliveries until it has seen each id, acknowledging those and
    /// giving the others back.
    #[command(
        after_help = "Examples:\n  courier queue pop jobs --requeue   # prints ID: DATA, and gives it back\n  courier queue ack jobs 42\n  courier queue ack jobs 42 43 --wait 10s"
    )]
    Ack {
        /// The queue.
        queue: String,
        /// Message ids, as `pop` prints them.
        ids: Vec<u64>,
        /// How long to look for them.
        #[arg(long, default_value = "5s", value_parser = crate::parse_duration)]
        wait: Duration,
    },
    /// Show the next ready messages (oldest first, as consumers would get
    /// them) without taking or leasing them: nothing changes, and a
    /// consumer may take them the moment after. Messages leased to
    /// consumers and delayed ones not yet due are not shown. Exit code 4
    /// if none is ready.
    #[command(
        after_help = "Examples:\n  courier queue peek jobs\n  courier queue peek jobs --count 20\n  courier --json queue peek jobs.dlq --count 5   # id, deliveries, data"
    )]
    Peek {
        /// The queue (it must exist).
        queue: String,
        /// How many to show, 1 to 1000 (fewer if their data passes 1 MiB).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=courier_queue::remote::MAX_PEEK as i64))]
        count: u32,
    },
    /// Remove every message waiting in the queue (ready, or delayed and not
    /// yet due), durably, and print how many. Messages leased to consumers
    /// (in flight) are not removed: an ack removes them as usual, and a
    /// nack, an expired lease or a consumer that goes away makes them ready
    /// again, so a later purge or consumer sees them.
    #[command(
        after_help = "Examples:\n  courier queue purge jobs\n  courier queue purge jobs.dlq          # discard its dead letters\n  courier --json queue purge jobs       # {\"queue\":\"jobs\",\"purged\":3,\"in_flight\":1}"
    )]
    Purge {
        /// The queue (it must exist).
        queue: String,
    },
    /// A queue's counters, as a table (`--json`: one object).
    #[command(
        after_help = "Examples:\n  courier queue stats jobs\n  courier queue stats jobs.dlq          # its dead letters\n  courier --json queue stats jobs | jq .depth"
    )]
    Stats {
        /// The queue.
        queue: String,
    },
    /// Every queue the broker has open, with its depth, leased messages and consumers.
    #[command(
        after_help = "Examples:\n  courier queue list\n  courier --json queue list | jq -r .queue"
    )]
    List,
}

pub async fn queue(url: &str, json: bool, command: QueueCommand) -> anyhow::Result<()> {
    // Checked here: a host reports a bad name only as a failure (exit 1),
    // and it is bad input (exit 2).
    let name = match &command {
        QueueCommand::Push { queue, .. }
        | QueueCommand::Pop { queue, .. }
        | QueueCommand::Ack { queue, .. }
        | QueueCommand::Stats { queue }
        | QueueCommand::Peek { queue, .. }
        | QueueCommand::Purge { queue } => Some(queue.as_str()),
        QueueCommand::List => None,
    };
    if let Some(name) = name {
        courier_queue::Queue::check_name(name).map_err(Failure::usage)?;
    }
    let client = connect(url).await?;
    match command {
        QueueCommand::Push {
            queue,
            data,
            lines,
            key,
        } => {
            let queue = RemoteQueue::with_client(client, &queue);
            let message = |payload: Bytes| {
                let message = courier_queue::Message::new(payload);
                match &key {
                    Some(key) => message.with_key(key.clone()),
                    None => message,
                }
            };
            if lines {
                let sent = each_line_batch(|batch| {
                    let queue = queue.clone();
                    let batch: Vec<_> = batch.into_iter().map(&message).collect();
                    async move {
                        queue.enqueue_batch(batch).await?;
                        Ok(())
                    }
                })
                .await?;
                eprintln!("stored {sent} messages in {}", queue.name());
            } else {
                let outcome = queue.enqueue(message(data_or_stdin(data)?)).await?;
                match outcome {
                    courier_queue::Enqueued::Stored(id) => {
                        eprintln!("stored as message {id} in {}", queue.name())
                    }
                    courier_queue::Enqueued::Duplicate(id) => eprintln!(
                        "duplicate of message {id} (same key); nothing stored in {}",
                        queue.name()
                    ),
                }
            }
            Ok(())
        }
        QueueCommand::Pop {
            queue,
            count,
            wait,
            requeue,
        } => {
            let queue = RemoteQueue::with_client(client, &queue);
            let mut consumer = queue.consumer(count.clamp(1, 1000) as u32).await?;
            for _ in 0..count {
                let delivery = match tokio::time::timeout(wait, consumer.recv()).await {
                    Ok(delivery) => delivery?,
                    Err(_) => {
                        return Err(Failure::nothing(format!(
                            "no message in {} within {wait:?}",
                            queue.name()
                        ))
                        .into())
                    }
                };
                let mut out = std::io::stdout().lock();
                if json {
                    let line = serde_json::json!({
                        "id": delivery.id,
                        "delivery": delivery.delivery,
                        "data": String::from_utf8_lossy(&delivery.payload),
                    });
                    writeln!(out, "{line}")?;
                } else {
                    writeln!(
                        out,
                        "{}: {}",
                        delivery.id,
                        String::from_utf8_lossy(&delivery.payload)
                    )?;
                }
                out.flush()?;
                drop(out);
                if requeue {
                    delivery.nack(Duration::ZERO).await?;
                } else {
                    delivery.ack().await?;
                }
            }
            Ok(())
        }
        QueueCommand::Ack { queue, ids, wait } => {
            let queue = RemoteQueue::with_client(client, &queue);
            let mut wanted: std::collections::BTreeSet<u64> = ids.into_iter().collect();
            let mut consumer = queue.consumer(1000).await?;
            let mut held = Vec::new();
            let deadline = tokio::time::Instant::now() + wait;
            while !wanted.is_empty() {
                let delivery = match tokio::time::timeout_at(deadline, consumer.recv()).await {
                    Ok(delivery) => delivery?,
                    _ => break,
                };
                if wanted.remove(&delivery.id) {
                    let id = delivery.id;
                    delivery.ack().await?;
                    eprintln!("acknowledged {id}");
                } else {
                    held.push(delivery);
                }
            }
            for delivery in held {
                delivery.nack(Duration::ZERO).await?;
            }
            if !wanted.is_empty() {
                return Err(Failure::nothing(format!(
                    "not found waiting in {} within {wait:?}: {wanted:?}",
                    queue.name()
                ))
                .into());
            }
            Ok(())
        }
        QueueCommand::Stats { queue } => {
            let stats = RemoteQueue::with_client(client.clone(), &queue)
                .stats()
                .await?;
            let replication = replication(client, &queue).await;
            if json {
                let mut value = serde_json::to_value(stats)?;
                if let (Some(replication), Some(object)) = (&replication, value.as_object_mut()) {
                    object.insert("replication".into(), serde_json::to_value(replication)?);
                }
                println!("{value}");
            } else {
                print!("{}", stats_table(&queue, &stats));
                if let Some(replication) = &replication {
                    print!("{}", replication_table(replication));
                }
            }
            Ok(())
        }
        QueueCommand::Peek { queue, count } => {
            let peeked = RemoteQueue::with_client(client, &queue).peek(count).await?;
            if peeked.is_empty() {
                return Err(Failure::nothing(format!("no ready message in {queue}")).into());
            }
            let mut out = std::io::stdout().lock();
            for message in peeked {
                if json {
                    let line = serde_json::json!({
                        "id": message.id,
                        "deliveries": message.deliveries,
                        "data": String::from_utf8_lossy(&message.payload),
                    });
                    writeln!(out, "{line}")?;
                } else {
                    writeln!(
                        out,
                        "{}: {}",
                        message.id,
                        String::from_utf8_lossy(&message.payload)
                    )?;
                }
            }
            out.flush()?;
            Ok(())
        }
        QueueCommand::Purge { queue } => {
            let remote = RemoteQueue::with_client(client, &queue);
            let purged = remote.purge().await?;
            // What stayed: leased messages, for the message below.
            let in_flight = remote.stats().await.map_or(0, |stats| stats.in_flight);
            if json {
                println!(
                    "{}",
                    serde_json::json!({"queue": queue, "purged": purged, "in_flight": in_flight})
                );
            } else if in_flight > 0 {
                println!(
                    "purged {purged} messages from {queue}; {in_flight} leased to consumers stay until answered"
                );
            } else {
                println!("purged {purged} messages from {queue}");
            }
            Ok(())
        }
        QueueCommand::List => {
            let stats = BrokerServiceClient::new(client).stats().await?;
            for queue in &stats.queues {
                if json {
                    println!(
                        "{}",
                        serde_json::json!({"queue": queue.name, "depth": queue.stats.depth, "in_flight": queue.stats.in_flight, "consumers": queue.stats.consumers})
                    );
                } else {
                    println!(
                        "{:<40} depth {:>8}  in flight {:>6}  consumers {:>4}",
                        queue.name, queue.stats.depth, queue.stats.in_flight, queue.stats.consumers
                    );
                }
            }
            Ok(())
        }
    }
}

/// How a replicated queue's group stands, as its leader sees it (with
/// each replica's lag) if the leader can be asked, else as the node
/// `client` is connected to sees it; `None` for a queue that is not
/// replicated, or a broker outside a cluster.
async fn replication(
    client: courier_rpc::Client,
    queue: &str,
) -> Option<courier_broker::ReplicatedQueueStatus> {
    let name = queue.strip_suffix(".dlq").unwrap_or(queue);
    let here = BrokerServiceClient::new(client).stats().await.ok()?;
    let status = here.cluster?.queues.into_iter().find(|q| q.name == name)?;
    if status.role == "leader" {
        return Some(status);
    }
    let address = status
        .replicas
        .iter()
        .find(|r| Some(r.id) == status.leader)
        .and_then(|r| r.address.parse::<courier_transport::Address>().ok());
    if let Some(address) = address {
        if let Ok(leader) = courier_rpc::Client::connect(&address, client_config()).await {
            if let Ok(stats) = BrokerServiceClient::new(leader).stats().await {
                let found = stats
                    .cluster
                    .and_then(|c| c.queues.into_iter().find(|q| q.name == name));
                if let Some(found) = found.filter(|q| q.role == "leader") {
                    return Some(found);
                }
            }
        }
    }
    Some(status)
}

/// A replicated queue's group: leader, term and each replica's lag.
fn replication_table(status: &courier_broker::ReplicatedQueueStatus) -> String {
    let leader = status.leader.map_or_else(
        || "none (an election)".to_string(),
        |id| format!("node {id}"),
    );
    let mut table = format!(
        "replicated (group {}): leader {leader}, term {}\n",
        status.group, status.term
    );
    for replica in &status.replicas {
        let lag = match replica.lag {
            Some(0) => "up to date".to_string(),
            Some(n) => format!("{n} entries behind"),
            None => "lag unknown (ask the leader)".to_string(),
        };
        let role = if Some(replica.id) == status.leader {
            "leader"
        } else {
            "follower"
        };
        table.push_str(&format!(
            "  node {} {:<8} {}  {lag}\n",
            replica.id, role, replica.address
        ));
    }
    table
}

/// A queue's counters as a two-column table, one counter a line.
fn stats_table(queue: &str, stats: &courier_queue::core::QueueStats) -> String {
    let rows: [(&str, String); 11] = [
        ("waiting (ready or delayed)", stats.depth.to_string()),
        ("in flight (leased)", stats.in_flight.to_string()),
        ("consumers attached", stats.consumers.to_string()),
        ("enqueued since open", stats.enqueued.to_string()),
        ("delivered", stats.delivered.to_string()),
        ("redelivered", stats.redelivered.to_string()),
        ("acknowledged", stats.acknowledged.to_string()),
        ("dead-lettered", stats.dead_lettered.to_string()),
        ("expired", stats.expired.to_string()),
        ("duplicates refused", stats.duplicates.to_string()),
        ("bytes on disk", stats.bytes_on_disk.to_string()),
    ];
    let width = rows.iter().map(|(name, _)| name.len()).max().unwrap_or(0);
    let values = rows.iter().map(|(_, v)| v.len()).max().unwrap_or(0);
    let mut table = format!("queue {queue}\n");
    for (name, value) in rows {
        table.push_str(&format!("  {name:<width$}  {value:>values$}\n"));
    }
    table
}

pub fn print_stats(stats: &BrokerStats) {
    println!(
        "up {:.1} s, {} connections, {} subscriptions",
        stats.uptime_ms as f64 / 1000.0,
        stats.connections,
        stats.subscriptions
    );
    println!(
        "pub/sub: {} published, {} delivered, {} dropped, {} stored durably",
        stats.published, stats.delivered, stats.dropped, stats.stored
    );
    for (name, filter) in &stats.durable {
        println!("durable subscription {name} on {filter}");
    }
    for queue in &stats.queues {
        let s = &queue.stats;
        println!(
            "queue {}: depth {}, in flight {}, consumers {}, enqueued {}, delivered {}, acknowledged {}, redelivered {}, dead-lettered {}",
            queue.name, s.depth, s.in_flight, s.consumers, s.enqueued, s.delivered, s.acknowledged, s.redelivered, s.dead_lettered
        );
    }
}

pub async fn stats(url: &str, json: bool) -> anyhow::Result<()> {
    let stats = BrokerServiceClient::new(connect(url).await?)
        .stats()
        .await?;
    if json {
        println!("{}", serde_json::to_string(&stats)?);
    } else {
        print_stats(&stats);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_stats_read_as_a_table() {
        let mut stats = courier_queue::core::QueueStats::default();
        stats.depth = 3;
        stats.acknowledged = 12345;
        stats.consumers = 2;
        stats.enqueued = 777;
        let table = stats_table("jobs", &stats);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines[0], "queue jobs");
        assert_eq!(lines.len(), 12, "{table}");
        assert!(
            lines[1].starts_with("  waiting (ready or delayed)"),
            "{table}"
        );
        assert!(lines[1].ends_with("    3"), "{table}");
        assert!(lines
            .iter()
            .any(|l| l.contains("acknowledged") && l.ends_with("12345")));
        assert!(lines
            .iter()
            .any(|l| l.contains("consumers attached") && l.ends_with(" 2")));
        assert!(lines
            .iter()
            .any(|l| l.contains("enqueued since open") && l.ends_with(" 777")));
        // Every value ends in the same column.
        assert!(
            lines[1..].iter().all(|l| l.len() == lines[1].len()),
            "{table}"
        );
        assert!(!table.contains('{'), "not a Debug dump: {table}");
    }
}
