//! Publish–subscribe and request–reply through a broker: Courier's
//! `RemotePubSub` and NATS's `async-nats`, written the same way. Every
//! subscriber counts what it receives and checks the order (each payload
//! starts with its number), so a loss or a reordering is an error, never a
//! rate.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use bytes::Bytes;
use courier_pubsub::remote::RemotePubSub;
use courier_pubsub::{Event, SlowConsumer, SubscribeOptions};
use courier_rpc::ClientConfig;
use courier_transport::Address;
use futures::StreamExt;
use hdrhistogram::Histogram;

/// How the Courier publisher sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Publishing {
    /// One `publish` call per message.
    Plain,
    /// `publish_batch` of 256, one batch at a time.
    Batched,
}

/// The message numbered `n`: its number in the first eight bytes.
pub fn numbered(size: usize, n: u64) -> Bytes {
    let mut body = vec![0xA5u8; size.max(8)];
    body[..8].copy_from_slice(&n.to_le_bytes());
    body.into()
}

fn number(payload: &[u8]) -> anyhow::Result<u64> {
    let head = payload
        .get(..8)
        .context("a message shorter than its number")?;
    Ok(u64::from_le_bytes(head.try_into()?))
}

/// Checks one subscriber's stream: every number from 0 to `count`, in order.
struct Checker {
    received: u64,
    count: u64,
}

impl Checker {
    fn new(count: u64) -> Checker {
        Checker { received: 0, count }
    }

    fn take(&mut self, payload: &[u8]) -> anyhow::Result<bool> {
        let n = number(payload)?;
        ensure!(
            n == self.received,
            "message {n} arrived as number {}: lost or reordered",
            self.received
        );
        self.received += 1;
        Ok(self.received == self.count)
    }
}

/// Bounds a receiver's wait, so a lost message ends the workload with the
/// count instead of hanging it.
fn patience(count: u64) -> Duration {
    Duration::from_secs(30) + Duration::from_micros(count * 20)
}

fn address(addr: SocketAddr) -> Address {
    Address::tcp(addr)
}

/// Courier: `fan_out` subscribers on their own connections, one publisher;
/// messages delivered per second (all subscribers together).
pub async fn courier(
    addr: SocketAddr,
    count: u64,
    size: usize,
    fan_out: usize,
    publishing: Publishing,
) -> anyhow::Result<f64> {
    let subject = format!("peers.{}.{}", std::process::id(), rand_tag());
    let mut readers = Vec::new();
    for _ in 0..fan_out {
        let bus = RemotePubSub::connect(&address(addr), ClientConfig::default()).await?;
        let mut sub = bus
            .subscribe(
                &subject,
                SubscribeOptions::default()
                    .buffer(8192)
                    .policy(SlowConsumer::Backpressure),
            )
            .await?;
        readers.push(tokio::spawn(async move {
            let _bus = bus;
            let mut checker = Checker::new(count);
            loop {
                match tokio::time::timeout(patience(count), sub.recv()).await {
                    Err(_) => bail!("received {} of {count}, then nothing", checker.received),
                    Ok(Some(Ok(Event::Message(message)))) => {
                        if checker.take(&message.payload)? {
                            return Ok(());
                        }
                    }
                    Ok(Some(Ok(Event::Gap { from, to, .. }))) => bail!(
                        "the broker dropped messages {from}..{to} after {} of {count}",
                        checker.received
                    ),
                    Ok(Some(Ok(_))) => {}
                    Ok(Some(Err(err))) => return Err(err.into()),
                    Ok(None) => bail!("the subscription ended after {}", checker.received),
                }
            }
        }));
    }
    let bus = RemotePubSub::connect(&address(addr), ClientConfig::default()).await?;
    let publisher = bus.publisher();
    let started = Instant::now();
    match publishing {
        Publishing::Plain => {
            for n in 0..count {
                publisher.publish(&subject, numbered(size, n)).await?;
            }
        }
        Publishing::Batched => {
            let mut sent = 0;
            while sent < count {
                let n = (count - sent).min(256);
                publisher
                    .publish_batch((sent..sent + n).map(|i| (subject.clone(), numbered(size, i))))
                    .await?;
                sent += n;
            }
        }
    }
    publisher.flush().await?;
    for reader in readers {
        reader.await??;
    }
    Ok((count * fan_out as u64) as f64 / started.elapsed().as_secs_f64())
}

/// NATS: the same shape with `async-nats` (its client batches writes by
/// itself, so there is one way to publish).
pub async fn nats(
    addr: SocketAddr,
    count: u64,
    size: usize,
    fan_out: usize,
) -> anyhow::Result<f64> {
    let subject = format!("peers.{}.{}", std::process::id(), rand_tag());
    let mut readers = Vec::new();
    for _ in 0..fan_out {
        let client = async_nats::connect(addr.to_string()).await?;
        let mut sub = client.subscribe(subject.clone()).await?;
        client.flush().await?;
        readers.push(tokio::spawn(async move {
            let _client = client;
            let mut checker = Checker::new(count);
            loop {
                match tokio::time::timeout(patience(count), sub.next()).await {
                    Err(_) => bail!("received {} of {count}, then nothing", checker.received),
                    Ok(Some(message)) => {
                        if checker.take(&message.payload)? {
                            return Ok(());
                        }
                    }
                    Ok(None) => bail!("the subscription ended after {}", checker.received),
                }
            }
        }));
    }
    let client = async_nats::connect(addr.to_string()).await?;
    let started = Instant::now();
    for n in 0..count {
        client.publish(subject.clone(), numbered(size, n)).await?;
    }
    client.flush().await?;
    for reader in readers {
        reader.await??;
    }
    Ok((count * fan_out as u64) as f64 / started.elapsed().as_secs_f64())
}

/// Courier request–reply to a responder on another connection; the
/// round-trip histogram in nanoseconds.
pub async fn courier_request(
    addr: SocketAddr,
    warmup: u64,
    count: u64,
    size: usize,
) -> anyhow::Result<Histogram<u64>> {
    let subject = format!("peers-svc.echo{}", rand_tag());
    let service = RemotePubSub::connect(&address(addr), ClientConfig::default()).await?;
    let mut requests = service
        .subscribe(&subject, SubscribeOptions::default().group("echo"))
        .await?;
    let replier = service.publisher();
    let responder = tokio::spawn(async move {
        while let Some(Ok(Event::Message(request))) = requests.recv().await {
            if replier
                .reply(&request, request.payload.clone())
                .await
                .is_err()
            {
                return;
            }
        }
    });
    let client = RemotePubSub::connect(&address(addr), ClientConfig::default()).await?;
    let payload = Bytes::from(vec![0xA5u8; size]);
    let mut histogram = courier_benches::latency_histogram();
    for i in 0..warmup + count {
        let started = Instant::now();
        let reply = client
            .request(&subject, payload.clone(), Duration::from_secs(10))
            .await?;
        ensure!(reply.payload.len() == size, "a reply of the wrong size");
        if i >= warmup {
            courier_benches::record(&mut histogram, started.elapsed());
        }
    }
    responder.abort();
    Ok(histogram)
}

/// NATS request–reply, the same shape.
pub async fn nats_request(
    addr: SocketAddr,
    warmup: u64,
    count: u64,
    size: usize,
) -> anyhow::Result<Histogram<u64>> {
    let subject = format!("peers-svc.echo{}", rand_tag());
    let service = async_nats::connect(addr.to_string()).await?;
    let mut requests = service
        .queue_subscribe(subject.clone(), "echo".into())
        .await?;
    service.flush().await?;
    let responder = tokio::spawn(async move {
        while let Some(request) = requests.next().await {
            if let Some(reply) = request.reply {
                if service.publish(reply, request.payload).await.is_err() {
                    return;
                }
            }
        }
    });
    let client = async_nats::connect(addr.to_string()).await?;
    let payload = Bytes::from(vec![0xA5u8; size]);
    let mut histogram = courier_benches::latency_histogram();
    for i in 0..warmup + count {
        let started = Instant::now();
        let reply = tokio::time::timeout(
            Duration::from_secs(10),
            client.request(subject.clone(), payload.clone()),
        )
        .await
        .context("a request timed out")??;
        ensure!(reply.payload.len() == size, "a reply of the wrong size");
        if i >= warmup {
            courier_benches::record(&mut histogram, started.elapsed());
        }
    }
    responder.abort();
    Ok(histogram)
}

/// A tag that keeps the subjects of successive runs apart.
pub fn rand_tag() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}
