//! A durable queue shared by two processes.
//!
//! The producer hosts the queues of a temporary directory over courier-rpc
//! ([`QueueHost`] on 127.0.0.1, a port the system picks), enqueues jobs
//! through the embedded [`Queue`](courier_queue::Queue) face of the same
//! queue, and starts the consumer: this same program, run as
//! `consumer ADDRESS`. The consumer takes the jobs over the network
//! ([`RemoteQueue`]) and acknowledges each, except one it fails on its
//! first delivery: the nack gives it back, and it is delivered again.
//!
//! The consumer's work is written once against [`QueueHandle`], the API
//! both faces share: run it on the embedded queue instead by passing a
//! `Queue` where it passes the `RemoteQueue` (one line).
//!
//! ```text
//! cargo run -p courier-queue --example jobs              # both processes
//! cargo run -p courier-queue --example jobs -- producer  # in one terminal,
//! cargo run -p courier-queue --example jobs -- consumer ADDRESS  # and another
//! ```
//!
//! Every wait is bounded: the example fails (exit code 1) rather than hangs.
//! The temporary directory is removed when the producer ends.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use courier_queue::core::QueueConfig;
use courier_queue::log::{FsyncPolicy, LogOptions};
use courier_queue::remote::{QueueHost, QueueServiceServer, QueueSet, RemoteQueue};
use courier_queue::{ConsumerHandle, DeliveryHandle, Enqueued, Message, QueueHandle, QueueOptions};
use courier_rpc::{ClientConfig, Server, ServerConfig};
use courier_transport::Address;

/// How many jobs the producer enqueues.
const JOBS: u32 = 6;
/// The job the consumer fails once.
const FLAKY: &str = "job-3";
/// The longest any run of either process may take.
const LIMIT: Duration = Duration::from_secs(30);

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let run = async {
        match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
            [] => producer(true).await,
            ["producer"] => producer(false).await,
            ["consumer", address] => consumer(address.parse()?).await,
            _ => bail!("usage: jobs [producer | consumer ADDRESS]"),
        }
    };
    tokio::time::timeout(LIMIT, run)
        .await
        .with_context(|| format!("not finished within {LIMIT:?}"))?
}

/// Hosts the queue, enqueues the jobs, and waits until all are acknowledged.
async fn producer(spawn_consumer: bool) -> anyhow::Result<()> {
    let dir = TempDir::new("courier-example-jobs")?;
    let options = QueueOptions::new(
        LogOptions::default().with_fsync(FsyncPolicy::Always),
        QueueConfig::default(),
    );
    let queues = QueueSet::new(&dir.0, options);
    let listener =
        courier_transport::bind(&"tcp://127.0.0.1:0".parse()?, &Default::default()).await?;
    let server = Server::new(ServerConfig::default())
        .service(QueueServiceServer::new(QueueHost::serving(queues.clone())))
        .spawn(listener);
    let address = server.local_addr().to_string();
    println!(
        "[producer] queues in {} served on {address}",
        dir.0.display()
    );

    let jobs = queues.open("jobs").await?;
    for n in 1..=JOBS {
        let job = format!("job-{n}");
        let key = job.clone();
        let Enqueued::Stored(id) = jobs
            .enqueue(Message::new(job.clone()).with_key(key))
            .await?
        else {
            bail!("{job} was taken for a duplicate");
        };
        println!("[producer] enqueued {job} (message {id:?}), durable");
    }
    // The same idempotency key again: nothing new is stored.
    let again = jobs
        .enqueue(Message::new("job-1").with_key("job-1"))
        .await?;
    println!("[producer] enqueued job-1 again: {again:?}, nothing new stored");

    if spawn_consumer {
        ChildProcess::spawn(&["consumer", &address])?
            .wait(LIMIT)
            .await?;
    } else {
        println!("[producer] start the consumer: jobs consumer {address}");
        while jobs.stats().await?.acknowledged < u64::from(JOBS) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let stats = jobs.stats().await?;
    println!(
        "[producer] stats: {} acknowledged, {} redelivered, {} left, {} duplicate",
        stats.acknowledged, stats.redelivered, stats.depth, stats.duplicates
    );
    ensure!(
        (stats.acknowledged, stats.depth, stats.in_flight) == (u64::from(JOBS), 0, 0),
        "every job should be acknowledged: {stats:?}"
    );
    server.shutdown(Duration::from_secs(2)).await;
    queues.close_all().await;
    Ok(())
}

/// Takes the jobs over the network, fails one once, acknowledges the rest.
async fn consumer(address: Address) -> anyhow::Result<()> {
    let queue = RemoteQueue::connect(&address, "jobs", ClientConfig::default()).await?;
    println!("[consumer] consuming {} at {address}", queue.name());
    work(&queue).await?;
    println!("[consumer] all {JOBS} jobs acknowledged");
    Ok(())
}

/// The consumer's work, on either face: takes [`JOBS`] jobs, fails
/// [`FLAKY`] once, acknowledges the rest.
async fn work<Q: QueueHandle>(queue: &Q) -> Result<(), Q::Error> {
    let mut consumer = queue.consumer(4).await?;
    let mut done = 0;
    while done < JOBS {
        let delivery = consumer.recv().await?;
        let job = String::from_utf8_lossy(delivery.payload()).into_owned();
        if job == FLAKY && delivery.delivery_count() == 1 {
            println!("[consumer] {job} failed on delivery 1: nack, it will come back");
            delivery.nack(Duration::ZERO).await?;
            continue;
        }
        println!(
            "[consumer] {job} done on delivery {}: ack",
            delivery.delivery_count()
        );
        delivery.ack().await?;
        done += 1;
    }
    Ok(())
}

/// A directory removed when dropped, whatever happened meanwhile.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> anyhow::Result<TempDir> {
        let dir = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        Ok(TempDir(dir))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
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
