//! Durable queues: Courier's `RemoteQueue` and NATS JetStream, with
//! `window` enqueues outstanding, then a consumer acknowledging every
//! message; and the disk's own limit for the same records.
//!
//! What an acknowledgement means differs, and the table says so:
//! - Courier answers an enqueue (and an ack) once its record is written
//!   and, under `fsync = always`, fdatasynced: group commit shares one
//!   fdatasync among everything written together.
//! - JetStream 2.9 answers a publish once the record is in its file store's
//!   page cache; it syncs every two minutes by default (`sync_interval`).
//!   Its `ack()` is a one-way publish the client does not wait on.

use std::collections::VecDeque;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use async_nats::jetstream;
use courier_queue::remote::RemoteQueue;
use courier_queue::Message;
use courier_rpc::ClientConfig;
use courier_transport::Address;
use futures::stream::FuturesUnordered;
use futures::StreamExt;

use crate::pubsub::{numbered, rand_tag};

/// Rates of one run: enqueues per second, then consume + ack per second.
#[derive(Clone, Copy, Debug)]
pub struct QueueRates {
    pub enqueue: f64,
    pub consume: f64,
}

fn patience(count: u64) -> Duration {
    Duration::from_secs(30) + Duration::from_micros(count * 50)
}

/// Seen message numbers: every one exactly once.
struct Seen(Vec<bool>, u64);

impl Seen {
    fn new(count: u64) -> Seen {
        Seen(vec![false; count as usize], 0)
    }

    fn take(&mut self, payload: &[u8]) -> anyhow::Result<()> {
        let head = payload
            .get(..8)
            .context("a message shorter than its number")?;
        let n = u64::from_le_bytes(head.try_into()?) as usize;
        let slot = self.0.get_mut(n).context("a message number out of range")?;
        ensure!(!*slot, "message {n} was delivered twice");
        *slot = true;
        self.1 += 1;
        Ok(())
    }
}

/// Courier: `count` single enqueues with `window` outstanding, then one
/// consumer (prefetch `window`) acknowledging each with up to `window`
/// acks outstanding.
pub async fn courier(
    addr: SocketAddr,
    count: u64,
    size: usize,
    window: usize,
) -> anyhow::Result<QueueRates> {
    let name = format!("peers-{}-{}", std::process::id(), rand_tag());
    let queue = RemoteQueue::connect(&Address::tcp(addr), &name, ClientConfig::default()).await?;
    let started = Instant::now();
    let mut outstanding = FuturesUnordered::new();
    for n in 0..count {
        if outstanding.len() >= window {
            outstanding.next().await.expect("non-empty")?;
        }
        let queue = &queue;
        outstanding.push(async move { queue.enqueue(Message::new(numbered(size, n))).await });
    }
    while let Some(done) = outstanding.next().await {
        done?;
    }
    let enqueue = count as f64 / started.elapsed().as_secs_f64();
    drop(outstanding);

    let started = Instant::now();
    let mut consumer = queue.consumer(window as u32).await?;
    let mut seen = Seen::new(count);
    let mut acks = FuturesUnordered::new();
    while seen.1 < count {
        tokio::select! {
            delivery = tokio::time::timeout(patience(count), consumer.recv()) => {
                let delivery = match delivery {
                    Err(_) => bail!("consumed {} of {count}, then nothing", seen.1),
                    Ok(Err(courier_queue::remote::RemoteQueueError::Closed)) => {
                        bail!("the broker ended the consumer after {}", seen.1)
                    }
                    Ok(delivery) => delivery?,
                };
                seen.take(&delivery.payload)?;
                acks.push(delivery.ack());
            }
            Some(done) = acks.next(), if !acks.is_empty() => done?,
        }
    }
    while let Some(done) = acks.next().await {
        done?;
    }
    let consume = count as f64 / started.elapsed().as_secs_f64();
    Ok(QueueRates { enqueue, consume })
}

/// JetStream: a file-backed stream, `count` publishes with `window` acks
/// outstanding, then a durable pull consumer with explicit acks.
pub async fn jetstream(
    addr: SocketAddr,
    count: u64,
    size: usize,
    window: usize,
) -> anyhow::Result<QueueRates> {
    let tag = rand_tag();
    let subject = format!("peersq.{tag}");
    let client = async_nats::connect(addr.to_string()).await?;
    let js = jetstream::new(client);
    let stream = js
        .create_stream(jetstream::stream::Config {
            name: format!("PEERS{tag}"),
            subjects: vec![subject.clone()],
            storage: jetstream::stream::StorageType::File,
            ..Default::default()
        })
        .await?;
    let started = Instant::now();
    let mut outstanding = VecDeque::with_capacity(window);
    for n in 0..count {
        if outstanding.len() >= window {
            let ack: jetstream::context::PublishAckFuture =
                outstanding.pop_front().expect("non-empty");
            ack.await?;
        }
        outstanding.push_back(js.publish(subject.clone(), numbered(size, n)).await?);
    }
    for ack in outstanding {
        ack.await?;
    }
    let enqueue = count as f64 / started.elapsed().as_secs_f64();

    let started = Instant::now();
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::Config {
            durable_name: Some(format!("peers{tag}")),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            ..Default::default()
        })
        .await?;
    let mut messages = consumer.messages().await?;
    let mut seen = Seen::new(count);
    while seen.1 < count {
        let message = match tokio::time::timeout(patience(count), messages.next()).await {
            Err(_) => bail!("consumed {} of {count}, then nothing", seen.1),
            Ok(None) => bail!("the consumer ended after {}", seen.1),
            Ok(Some(message)) => message.map_err(|err| anyhow::anyhow!("{err}"))?,
        };
        seen.take(&message.payload)?;
        message
            .ack()
            .await
            .map_err(|err| anyhow::anyhow!("{err}"))?;
    }
    let consume = count as f64 / started.elapsed().as_secs_f64();
    Ok(QueueRates { enqueue, consume })
}

/// The disk's limit for the same records: `count` records of `size`
/// bytes (plus an 8-byte header each, about what a log record carries)
/// appended to a file in `dir`, one write and one fdatasync per `batch`.
pub fn disk(dir: &Path, count: u64, size: usize, batch: usize) -> anyhow::Result<f64> {
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("records"))?;
    let mut buffer = Vec::with_capacity(batch * (size + 8));
    let record = vec![0xA5u8; size];
    let started = Instant::now();
    let mut written = 0u64;
    while written < count {
        buffer.clear();
        let n = (count - written).min(batch as u64);
        for i in 0..n {
            buffer.extend_from_slice(&((written + i) as u32).to_le_bytes());
            buffer.extend_from_slice(&(size as u32).to_le_bytes());
            buffer.extend_from_slice(&record);
        }
        file.write_all(&buffer)?;
        file.sync_data()?;
        written += n;
    }
    Ok(count as f64 / started.elapsed().as_secs_f64())
}
