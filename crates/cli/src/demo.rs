//! `courier demo`: a broker in this process, worker processes (this same
//! binary, `courier worker …`) on loopback, and all five mechanisms at
//! work between them. Ends with a table of what happened and how long it
//! took.
//!
//! A worker prints `ready [ADDRESS]` once it can be used, works until its
//! stdin closes and then until nothing has arrived for 100 ms, prints
//! `done COUNT` and exits.

use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Args, Subcommand};
use courier_broker::{Broker, BrokerConfig};
use courier_messaging::{Delivery, Node, NodeConfig};
use courier_pubsub::remote::RemotePubSub;
use courier_pubsub::{Event, SubscribeOptions};
use courier_queue::remote::RemoteQueue;
use courier_rpc::{Client, ClientConfig, Server, ServerConfig};
use courier_transport::{Address, Frame, FrameKind};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdout};

use crate::client::connect;

/// The RPC service the demo's RPC worker serves.
#[courier_rpc::service]
pub trait Shout {
    /// `text` in capitals, and which process did it.
    async fn shout(&self, text: String) -> (String, u32);
}

struct Shouter;

impl Shout for Shouter {
    async fn shout(&self, text: String) -> (String, u32) {
        (text.to_uppercase(), std::process::id())
    }
}

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Messages per step.
    #[arg(long, default_value_t = 3000)]
    count: u64,
}

#[derive(Args, Debug)]
pub struct WorkerArgs {
    #[command(subcommand)]
    kind: WorkerKind,
}

#[derive(Subcommand, Debug)]
enum WorkerKind {
    /// Echo frames on a raw transport listener.
    Echo { listen: String },
    /// A messaging node counting u64 messages in mailbox `inbox`, answering
    /// `count` requests.
    Node { listen: String },
    /// Serve the Shout RPC service.
    Rpc { listen: String },
    /// Consume and acknowledge a queue.
    Consume { queue: String },
    /// Count messages on a filter, optionally in a queue group.
    Subscribe {
        filter: String,
        #[arg(long)]
        group: Option<String>,
    },
    /// Answer requests on a subject, in queue group `group`.
    Respond { subject: String, group: String },
}

/// Runs a worker until its stdin closes.
pub async fn worker(url: &str, args: WorkerArgs) -> anyhow::Result<()> {
    let count = Arc::new(AtomicU64::new(0));
    let counted = count.clone();
    let ready = |address: Option<&Address>| match address {
        Some(address) => println!("ready {address}"),
        None => println!("ready"),
    };
    // Kept alive until stdin closes.
    let mut _keep: Vec<Box<dyn std::any::Any + Send>> = Vec::new();
    match args.kind {
        WorkerKind::Echo { listen } => {
            let mut listener =
                courier_transport::bind(&listen.parse()?, &Default::default()).await?;
            ready(Some(listener.local_addr()));
            _keep.push(Box::new(tokio::spawn(async move {
                while let Ok(connection) = listener.accept().await {
                    let count = counted.clone();
                    tokio::spawn(async move {
                        let (sender, mut receiver) = connection.split();
                        while let Ok(Some(frame)) = receiver.recv().await {
                            count.fetch_add(1, Ordering::Relaxed);
                            if sender.send(frame).await.is_err() {
                                return;
                            }
                        }
                    });
                }
            })));
        }
        WorkerKind::Node { listen } => {
            let node = Node::start(NodeConfig::listening(listen.parse()?)).await?;
            let mut inbox = node.mailbox::<u64>("inbox")?;
            let seen = counted.clone();
            node.respond("count", move |(): ()| {
                let seen = seen.clone();
                async move { seen.load(Ordering::Relaxed) }
            })?;
            ready(node.addresses().first());
            _keep.push(Box::new(tokio::spawn(async move {
                while inbox.recv().await.is_some() {
                    counted.fetch_add(1, Ordering::Relaxed);
                }
            })));
            _keep.push(Box::new(node));
        }
        WorkerKind::Rpc { listen } => {
            let listener = courier_transport::bind(&listen.parse()?, &Default::default()).await?;
            let server = Server::new(ServerConfig::default())
                .service(ShoutServer::new(Shouter))
                .spawn(listener);
            ready(Some(server.local_addr()));
            _keep.push(Box::new(server));
        }
        WorkerKind::Consume { queue } => {
            let queue = RemoteQueue::with_client(connect(url).await?, &queue);
            let mut consumer = queue.consumer(16).await?;
            ready(None);
            _keep.push(Box::new(tokio::spawn(async move {
                while let Ok(delivery) = consumer.recv().await {
                    // A little work, so the load visibly spreads.
                    tokio::time::sleep(Duration::from_micros(200)).await;
                    if delivery.ack().await.is_ok() {
                        counted.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })));
        }
        WorkerKind::Subscribe { filter, group } => {
            let bus = RemotePubSub::with_client(connect(url).await?);
            let mut options = SubscribeOptions::default().buffer(100_000);
            if let Some(group) = group {
                options = options.group(group);
            }
            let mut subscription = bus.subscribe(&filter, options).await?;
            ready(None);
            _keep.push(Box::new(tokio::spawn(async move {
                while let Some(Ok(event)) = subscription.recv().await {
                    if matches!(event, Event::Message(_)) {
                        counted.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })));
        }
        WorkerKind::Respond { subject, group } => {
            let bus = RemotePubSub::with_client(connect(url).await?);
            let mut requests = bus
                .subscribe(&subject, SubscribeOptions::default().group(group))
                .await?;
            let replier = bus.publisher();
            ready(None);
            _keep.push(Box::new(tokio::spawn(async move {
                while let Some(Ok(Event::Message(request))) = requests.recv().await {
                    let reply = format!(
                        "{} (from process {})",
                        String::from_utf8_lossy(&request.payload).to_uppercase(),
                        std::process::id()
                    );
                    if replier.reply(&request, reply).await.is_ok() {
                        counted.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })));
        }
    }
    // Work until the demo closes stdin.
    let mut stdin = BufReader::new(tokio::io::stdin());
    let mut line = String::new();
    while stdin.read_line(&mut line).await.unwrap_or(0) > 0 {
        line.clear();
    }
    // Whatever was sent before stdin closed is on its way: count until
    // nothing has come for a moment.
    let mut last = count.load(Ordering::Relaxed);
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = count.load(Ordering::Relaxed);
        if now == last {
            break;
        }
        last = now;
    }
    println!("done {last}");
    Ok(())
}

/// A worker process and its stdout.
struct Worker {
    child: Child,
    stdout: tokio::io::Lines<BufReader<ChildStdout>>,
    address: Option<Address>,
}

impl Worker {
    async fn start(url: &Address, args: &[&str]) -> anyhow::Result<Worker> {
        let exe = std::env::current_exe().context("cannot find the courier executable")?;
        let mut child = tokio::process::Command::new(exe)
            .arg("--url")
            .arg(url.to_string())
            .arg("worker")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("cannot start a worker process")?;
        let stdout = child.stdout.take().context("worker stdout")?;
        let mut stdout = BufReader::new(stdout).lines();
        let line = tokio::time::timeout(Duration::from_secs(30), stdout.next_line())
            .await
            .context("a worker did not get ready within 30 s")??
            .context("a worker exited before it was ready")?;
        let address = match line.strip_prefix("ready") {
            Some(rest) if rest.trim().is_empty() => None,
            Some(rest) => Some(rest.trim().parse()?),
            None => anyhow::bail!("a worker said {line:?} instead of ready"),
        };
        Ok(Worker {
            child,
            stdout,
            address,
        })
    }

    /// Closes its stdin and returns the count it reports.
    async fn finish(mut self) -> anyhow::Result<u64> {
        if let Some(mut stdin) = self.child.stdin.take() {
            let _ = stdin.shutdown().await;
        }
        let line = tokio::time::timeout(Duration::from_secs(30), self.stdout.next_line())
            .await
            .context("a worker did not finish within 30 s")??
            .context("a worker exited without its count")?;
        let count = line
            .strip_prefix("done ")
            .and_then(|n| n.trim().parse().ok())
            .with_context(|| format!("a worker said {line:?} instead of done"))?;
        let _ = self.child.wait().await;
        Ok(count)
    }
}

struct Row {
    mechanism: &'static str,
    happened: String,
    took: Duration,
    figure: String,
}

fn rate(count: u64, took: Duration) -> String {
    format!("{:.0}/s", count as f64 / took.as_secs_f64().max(1e-9))
}

pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let count = args.count.max(10);
    let dir = std::env::temp_dir().join(format!("courier-demo-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut config = BrokerConfig::default();
    config.listen = vec!["tcp://127.0.0.1:0".into()];
    config.data_dir = dir.clone();
    config.metrics = String::new();
    let broker = Broker::start(config).await?;
    let url = broker.addresses()[0].clone();
    println!("broker on {url} (data in {})\n", dir.display());
    let outcome = steps(&url, count).await;
    let stats = broker.stats().await;
    broker.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
    let rows = outcome?;
    let wide = rows
        .iter()
        .map(|r| r.happened.chars().count())
        .max()
        .unwrap_or(0);
    println!(
        "\n{:<22} {:<wide$} {:>9} {:>12}",
        "mechanism", "what happened", "time", "figure"
    );
    println!("{}", "-".repeat(22 + wide + 9 + 12 + 3));
    for row in rows {
        println!(
            "{:<22} {:<wide$} {:>7.0}ms {:>12}",
            row.mechanism,
            row.happened,
            row.took.as_secs_f64() * 1000.0,
            row.figure
        );
    }
    println!(
        "\nbroker counters: {} published, {} delivered, {} dropped; queues: {}",
        stats.published,
        stats.delivered,
        stats.dropped,
        stats
            .queues
            .iter()
            .map(|q| format!("{} (acked {})", q.name, q.stats.acknowledged))
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(())
}

async fn steps(url: &Address, count: u64) -> anyhow::Result<Vec<Row>> {
    let mut rows = Vec::new();
    let loopback = "tcp://127.0.0.1:0";

    // 1. Sockets: raw frames to a worker that echoes them.
    println!("sockets: frames over tcp to an echo process ...");
    let echo = Worker::start(url, &["echo", loopback]).await?;
    let connection = courier_transport::connect(
        echo.address.as_ref().context("echo address")?,
        &Default::default(),
    )
    .await?;
    let (sender, mut receiver) = connection.split();
    let mut rtts = Vec::with_capacity(count as usize);
    let started = Instant::now();
    for n in 0..count {
        let sent = Instant::now();
        sender
            .send(Frame::new(FrameKind::Data, n, vec![0xA5; 64]))
            .await?;
        let frame = receiver.recv().await?.context("echo closed")?;
        anyhow::ensure!(frame.id == n, "echo out of order");
        rtts.push(sent.elapsed());
    }
    let took = started.elapsed();
    drop((sender, receiver));
    rtts.sort();
    let echoed = echo.finish().await?;
    rows.push(Row {
        mechanism: "sockets (tcp frames)",
        happened: format!("{count} 64 B frames echoed by another process ({echoed} counted there)"),
        took,
        figure: format!("p50 {:.0}µs", rtts[rtts.len() / 2].as_secs_f64() * 1e6),
    });

    // 2. Message passing: at-least-once messages, acknowledged by the node.
    println!("message passing: at-least-once messages to a node process ...");
    let peer = Worker::start(url, &["node", loopback]).await?;
    let peer_address = peer.address.clone().context("node address")?;
    let node = Node::start(NodeConfig::default()).await?;
    let sender = node.sender::<u64>(&peer_address, "inbox", Delivery::AtLeastOnce);
    let started = Instant::now();
    let mut sends = tokio::task::JoinSet::new();
    for n in 0..count {
        if sends.len() >= 256 {
            sends.join_next().await.expect("non-empty")??;
        }
        let sender = sender.clone();
        sends.spawn(async move { sender.send(n).await.map(|_| ()) });
    }
    while let Some(done) = sends.join_next().await {
        done??;
    }
    let took = started.elapsed();
    let counted: u64 = node
        .request(&peer_address, "count", &(), Duration::from_secs(10))
        .await?;
    node.shutdown(Duration::from_secs(1)).await;
    peer.finish().await?;
    rows.push(Row {
        mechanism: "message passing",
        happened: format!(
            "{count} at-least-once messages, each acknowledged; the receiver counted {counted}"
        ),
        took,
        figure: rate(count, took),
    });

    // 3. RPC: many calls in flight on one connection.
    println!("rpc: calls to a service in another process ...");
    let rpc = Worker::start(url, &["rpc", loopback]).await?;
    let client = ShoutClient::new(
        Client::connect(
            rpc.address.as_ref().context("rpc address")?,
            ClientConfig::default(),
        )
        .await?,
    );
    let started = Instant::now();
    let mut calls = tokio::task::JoinSet::new();
    let mut sample = String::new();
    for n in 0..count {
        if calls.len() >= 64 {
            let (text, _) = calls.join_next().await.expect("non-empty")??;
            sample = text;
        }
        let client = client.clone();
        calls.spawn(async move { client.shout(format!("hello {n}")).await });
    }
    while let Some(done) = calls.join_next().await {
        done??;
    }
    let took = started.elapsed();
    let (_, server_pid) = client.shout("x".into()).await?;
    rpc.finish().await?;
    rows.push(Row {
        mechanism: "rpc",
        happened: format!(
            "{count} calls, 64 in flight on one connection, served by process {server_pid} (e.g. {sample:?})"
        ),
        took,
        figure: rate(count, took),
    });

    // 4. Queue: competing consumers share the jobs.
    println!("queue: jobs for three competing consumer processes ...");
    let mut consumers = Vec::new();
    for _ in 0..3 {
        consumers.push(Worker::start(url, &["consume", "demo.jobs"]).await?);
    }
    let queue = RemoteQueue::with_client(connect(&url.to_string()).await?, "demo.jobs");
    let started = Instant::now();
    let mut pushed = 0;
    while pushed < count {
        let n = (count - pushed).min(256);
        queue
            .enqueue_batch(
                (0..n)
                    .map(|i| courier_queue::Message::new(format!("job {}", pushed + i)))
                    .collect(),
            )
            .await?;
        pushed += n;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let stats = queue.stats().await?;
        if stats.acknowledged >= count {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the consumers took more than 60 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let took = started.elapsed();
    let mut shares = Vec::new();
    for consumer in consumers {
        shares.push(consumer.finish().await?);
    }
    rows.push(Row {
        mechanism: "queue (3 consumers)",
        happened: format!(
            "{count} durable jobs, each acknowledged once; shares {}",
            shares
                .iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(" / ")
        ),
        took,
        figure: rate(count, took),
    });

    // 5. Pub/sub: a wildcard subscriber and a queue group of two.
    println!("pub/sub: wildcards and a queue group across processes ...");
    let all = Worker::start(url, &["subscribe", "demo.orders.>"]).await?;
    let mut billing = Vec::new();
    for _ in 0..2 {
        billing.push(
            Worker::start(
                url,
                &["subscribe", "demo.orders.*.created", "--group", "billing"],
            )
            .await?,
        );
    }
    let bus = RemotePubSub::with_client(connect(&url.to_string()).await?);
    let publisher = bus.publisher();
    let started = Instant::now();
    let per_subject = count / 3;
    for subject in [
        "demo.orders.eu.created",
        "demo.orders.us.created",
        "demo.orders.eu.shipped",
    ] {
        let mut sent = 0;
        while sent < per_subject {
            let n = (per_subject - sent).min(256);
            publisher
                .publish_batch((0..n).map(|i| (subject, format!("order {}", sent + i))))
                .await?;
            sent += n;
        }
    }
    publisher.flush().await?;
    let took = started.elapsed();
    let everything = all.finish().await?;
    let mut group = Vec::new();
    for member in billing {
        group.push(member.finish().await?);
    }
    rows.push(Row {
        mechanism: "pub/sub",
        happened: format!(
            "{} published on 3 subjects; 'demo.orders.>' got {everything}; group on '*.created' got {} ({})",
            per_subject * 3,
            group.iter().sum::<u64>(),
            group.iter().map(u64::to_string).collect::<Vec<_>>().join(" + ")
        ),
        took,
        figure: rate(per_subject * 3, took),
    });

    // 6. A service reached by name through the broker, two instances.
    println!("services by name: requests to two responder processes ...");
    let mut responders = Vec::new();
    for _ in 0..2 {
        responders.push(Worker::start(url, &["respond", "svc.upper", "upper"]).await?);
    }
    let requests = (count / 10).max(10);
    let started = Instant::now();
    let mut sample = String::new();
    for n in 0..requests {
        let reply = bus
            .request("svc.upper", format!("request {n}"), Duration::from_secs(10))
            .await?;
        sample = String::from_utf8_lossy(&reply.payload).into_owned();
    }
    let took = started.elapsed();
    let mut answered = Vec::new();
    for responder in responders {
        answered.push(responder.finish().await?);
    }
    rows.push(Row {
        mechanism: "service by name",
        happened: format!(
            "{requests} requests to svc.upper, answered {} (e.g. {sample:?})",
            answered
                .iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(" + ")
        ),
        took,
        figure: format!("{:.0}µs/req", took.as_secs_f64() * 1e6 / requests as f64),
    });
    Ok(rows)
}
