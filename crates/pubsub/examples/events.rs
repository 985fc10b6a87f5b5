//! Publish-subscribe between two processes.
//!
//! The host serves an in-process [`Bus`] over courier-rpc ([`PubSubHost`]
//! on 127.0.0.1, a port the system picks) and starts the subscriber: this
//! same program, run as `subscriber ADDRESS`. The subscriber connects
//! ([`RemotePubSub`]) and subscribes with wildcards (`orders.>`,
//! `orders.*.created`), twice in the queue group `workers` (each job goes
//! to one member only), and as the `greet` service; then it says it is
//! ready. The host publishes on its own bus, which reaches the subscriber,
//! and sends a request that the subscriber answers.
//!
//! Both halves are written once, against the [`PubSub`] trait: the host
//! runs its half on the in-process [`Bus`], the subscriber its half on a
//! [`RemotePubSub`]; either would run unchanged on the other face (the one
//! line that makes the bus is all that differs).
//!
//! ```text
//! cargo run -p courier-pubsub --example events              # both processes
//! cargo run -p courier-pubsub --example events -- host      # in one terminal,
//! cargo run -p courier-pubsub --example events -- subscriber ADDRESS  # and another
//! ```
//!
//! Every wait is bounded: the example fails (exit code 1) rather than hangs.

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use courier_pubsub::remote::{PubSubHost, PubSubServiceServer, RemotePubSub};
use courier_pubsub::{Bus, Event, Message, PubSub, Publish, SubscribeOptions, Subscriber};
use courier_rpc::{ClientConfig, Server, ServerConfig};
use courier_transport::Address;

/// The orders the host publishes, all matched by `orders.>`.
const ORDERS: [&str; 3] = [
    "orders.eu.created",
    "orders.us.created",
    "orders.eu.shipped",
];
/// How many of them `orders.*.created` matches.
const CREATED: usize = 2;
/// The jobs the host publishes to the queue group.
const JOBS: usize = 6;
/// The longest any run of either process may take.
const LIMIT: Duration = Duration::from_secs(30);

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let run = async {
        match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
            [] => host(true).await,
            ["host"] => host(false).await,
            ["subscriber", address] => subscriber(address.parse()?).await,
            _ => bail!("usage: events [host | subscriber ADDRESS]"),
        }
    };
    tokio::time::timeout(LIMIT, run)
        .await
        .with_context(|| format!("not finished within {LIMIT:?}"))?
}

/// Serves the bus, waits for the subscriber, publishes, and asks.
async fn host(spawn_subscriber: bool) -> anyhow::Result<()> {
    let bus = Bus::new();
    let listener =
        courier_transport::bind(&"tcp://127.0.0.1:0".parse()?, &Default::default()).await?;
    let server = Server::new(ServerConfig::default())
        .service(PubSubServiceServer::new(PubSubHost::new(bus.clone())))
        .spawn(listener);
    let address = server.local_addr().to_string();
    println!("[host] bus served on {address}");
    let mut ready = bus
        .subscribe("example.ready", SubscribeOptions::default())
        .await?;
    let child = if spawn_subscriber {
        Some(ChildProcess::spawn(&["subscriber", &address])?)
    } else {
        println!("[host] start the subscriber: events subscriber {address}");
        None
    };
    ready
        .recv()
        .await
        .context("the ready subscription closed")??;
    println!("[host] the subscriber is ready");
    publish_and_ask(&bus).await?;

    if let Some(child) = child {
        child.wait(LIMIT).await?;
    }
    server.shutdown(Duration::from_secs(2)).await;
    println!("[host] done");
    Ok(())
}

/// Publishes the orders and jobs, and asks the greeter: on any face.
async fn publish_and_ask<P: PubSub>(bus: &P) -> anyhow::Result<()> {
    let publisher = bus.publisher();
    for subject in ORDERS {
        let reached = publisher.publish_confirmed(subject, "an order").await?;
        println!("[host] published {subject} to {reached} subscription(s)");
    }
    bus.publish_batch((1..=JOBS).map(|n| ("work.resize", format!("image-{n}"))))
        .await?;
    println!("[host] published {JOBS} jobs on work.resize");
    let reply = bus
        .request("greet", "world", Duration::from_secs(5))
        .await?;
    println!(
        "[host] request greet(world) answered: {}",
        String::from_utf8_lossy(&reply.payload)
    );
    ensure!(&reply.payload[..] == b"hello, world", "a wrong reply");
    Ok(())
}

/// Connects and runs the subscriber's half.
async fn subscriber(address: Address) -> anyhow::Result<()> {
    // The one line that picks the face: `Bus::new()` here would run the
    // same half in process.
    let bus = RemotePubSub::connect(&address, ClientConfig::default()).await?;
    println!("[subscriber] connected to {address}");
    subscribe_and_count(bus).await
}

/// Subscribes, says it is ready, and counts what arrives until all has: on
/// any face.
async fn subscribe_and_count<P: PubSub>(bus: P) -> anyhow::Result<()> {
    let workers = || SubscribeOptions::default().group("workers");
    let subscriptions = [
        (
            "orders.>",
            bus.subscribe("orders.>", SubscribeOptions::default()),
        ),
        (
            "orders.*.created",
            bus.subscribe("orders.*.created", SubscribeOptions::default()),
        ),
        ("worker a", bus.subscribe("work.*", workers())),
        ("worker b", bus.subscribe("work.*", workers())),
        (
            "greet",
            bus.subscribe("greet", SubscribeOptions::default().group("greeters")),
        ),
    ];
    // Each subscription feeds one channel, labelled, from a task of its own.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(&str, Message)>(64);
    for (label, subscription) in subscriptions {
        let mut subscription = subscription.await?;
        let tx = tx.clone();
        tokio::spawn(async move {
            while let Some(event) = subscription.recv().await {
                match event {
                    Ok(Event::Message(message)) => {
                        if tx.send((label, message)).await.is_err() {
                            return;
                        }
                    }
                    Ok(other) => println!("[subscriber] {label}: {other:?}"),
                    Err(err) => {
                        println!("[subscriber] {label}: {err}");
                        return;
                    }
                }
            }
        });
    }
    let publisher = bus.publisher();
    publisher.publish("example.ready", "").await?;
    publisher.flush().await?;
    println!("[subscriber] subscribed, ready");

    let (mut all, mut created, mut work, mut greeted) = (0, 0, [0, 0], 0);
    while all < ORDERS.len() || created < CREATED || work[0] + work[1] < JOBS || greeted < 1 {
        let (label, message) = rx.recv().await.context("every subscription ended")?;
        let payload = String::from_utf8_lossy(&message.payload).into_owned();
        println!(
            "[subscriber] {label}: {} {payload}",
            message.subject.as_str()
        );
        match label {
            "orders.>" => all += 1,
            "orders.*.created" => created += 1,
            "worker a" => work[0] += 1,
            "worker b" => work[1] += 1,
            _ => {
                publisher
                    .reply(&message, format!("hello, {payload}"))
                    .await?;
                publisher.flush().await?;
                greeted += 1;
            }
        }
    }
    println!(
        "[subscriber] orders.> got {all}, orders.*.created got {created}; \
         the workers shared {JOBS} jobs as {} + {}",
        work[0], work[1]
    );
    ensure!(
        all == ORDERS.len() && created == CREATED,
        "unexpected orders"
    );
    Ok(())
}

/// The second process: this program again, killed if it outlives us.
struct ChildProcess(std::process::Child);

impl ChildProcess {
    fn spawn(args: &[&str]) -> anyhow::Result<ChildProcess> {
        let program = std::env::current_exe()?;
        let child = std::process::Command::new(program).args(args).spawn()?;
        Ok(ChildProcess(child))
    }

    /// Waits for it to exit, and fails unless it exits successfully in time.
    async fn wait(mut self, within: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.0.try_wait()? {
                ensure!(status.success(), "the second process failed ({status})");
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "the second process did not finish within {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}
