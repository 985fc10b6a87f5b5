//! `courier bench`: the standard workloads against a running broker, with a
//! progress bar, HDR-histogram percentiles and an optional SVG plot of the
//! latency distribution.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use courier_pubsub::remote::RemotePubSub;
use courier_pubsub::{Event, SlowConsumer, SubscribeOptions};
use courier_queue::remote::RemoteQueue;
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};

use crate::client::connect;

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
enum Workload {
    /// One publisher to --fan-out subscribers: one `publish` call per
    /// message, then `publish_batch` of 256, in the same run.
    Pubsub,
    /// Request-reply through the broker to a responder in this process.
    Request,
    /// Durable queue: enqueue in batches of 256, then single enqueues with
    /// 256 outstanding, then consume and acknowledge everything.
    Queue,
}

#[derive(Args, Debug)]
#[command(
    after_help = "Examples:\n  courier bench                      # all workloads\n  courier bench pubsub --fan-out 4\n  courier bench request --count 20000 --plot latency.svg"
)]
pub struct BenchArgs {
    /// Which workloads (all if none given).
    workloads: Vec<Workload>,
    /// Messages (or requests) per workload.
    #[arg(long, default_value_t = 100_000)]
    count: u64,
    /// Message size in bytes.
    #[arg(long, default_value_t = 128)]
    size: usize,
    /// Subscribers for the pub/sub workload.
    #[arg(long, default_value_t = 1)]
    fan_out: usize,
    /// Write an SVG of the request latency distribution here.
    #[arg(long)]
    plot: Option<PathBuf>,
}

fn progress(count: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(count);
    bar.set_style(
        ProgressStyle::with_template("{msg:>10} [{bar:40}] {pos}/{len} ({per_sec}, {eta} left)")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_message(what.to_string());
    bar
}

fn report(json: bool, workload: &str, figures: serde_json::Value) {
    if json {
        println!(
            "{}",
            serde_json::json!({"workload": workload, "figures": figures})
        );
    } else {
        let mut line = format!("{workload:>8}:");
        if let Some(map) = figures.as_object() {
            for (key, value) in map {
                let _ = write!(line, "  {key} {value}");
            }
        }
        println!("{line}");
    }
}

pub async fn run(url: &str, json: bool, args: BenchArgs) -> anyhow::Result<()> {
    let workloads = if args.workloads.is_empty() {
        vec![Workload::Pubsub, Workload::Request, Workload::Queue]
    } else {
        args.workloads.clone()
    };
    let count = args.count.max(1);
    let payload = bytes::Bytes::from(vec![0xA5u8; args.size]);
    for workload in workloads {
        match workload {
            Workload::Pubsub => {
                let fan_out = args.fan_out.max(1);
                let plain = pubsub(url, count, fan_out, payload.clone(), Publishing::Plain).await?;
                let batched =
                    pubsub(url, count, fan_out, payload.clone(), Publishing::Batched).await?;
                report(
                    json,
                    "pubsub",
                    serde_json::json!({
                        "fan_out": fan_out,
                        "plain_delivered_msgs_per_s": plain.round(),
                        "batched_delivered_msgs_per_s": batched.round(),
                    }),
                );
            }
            Workload::Request => {
                let histogram = request(url, count, payload.clone()).await?;
                let us = |q: f64| histogram.value_at_quantile(q) as f64 / 1000.0;
                report(
                    json,
                    "request",
                    serde_json::json!({
                        "p50_us": us(0.5), "p90_us": us(0.9), "p99_us": us(0.99),
                        "p999_us": us(0.999), "max_us": histogram.max() as f64 / 1000.0,
                    }),
                );
                if let Some(path) = &args.plot {
                    std::fs::write(path, latency_svg(&histogram))?;
                    eprintln!("latency plot: {}", path.display());
                }
            }
            Workload::Queue => {
                let figures = queue(url, count, payload.clone()).await?;
                report(
                    json,
                    "queue",
                    serde_json::json!({
                        "enqueue_msgs_per_s": figures.batched.round(),
                        "pipelined_enqueue_msgs_per_s": figures.pipelined.round(),
                        "consume_ack_msgs_per_s": figures.consume.round(),
                    }),
                );
            }
        }
    }
    Ok(())
}

/// How the pub/sub workload publishes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Publishing {
    /// One `publish` call per message, as a user writes it.
    Plain,
    /// `publish_batch` of 256 messages at a time.
    Batched,
}

/// The message numbered `n`: its number in the first eight bytes, so the
/// receivers check order.
fn numbered(payload: &bytes::Bytes, n: u64) -> bytes::Bytes {
    let mut body = payload.to_vec();
    let len = body.len().min(8);
    body[..len].copy_from_slice(&n.to_le_bytes()[..len]);
    body.into()
}

async fn pubsub(
    url: &str,
    count: u64,
    fan_out: usize,
    payload: bytes::Bytes,
    publishing: Publishing,
) -> anyhow::Result<f64> {
    let subject = format!("bench.{}", std::process::id());
    let bar = progress(count * fan_out as u64, "pubsub");
    let mut readers = Vec::new();
    for _ in 0..fan_out {
        let bus = RemotePubSub::with_client(connect(url).await?);
        let mut sub = bus
            .subscribe(
                &subject,
                SubscribeOptions::default()
                    .buffer(8192)
                    .policy(SlowConsumer::Backpressure),
            )
            .await?;
        let bar = bar.clone();
        let checked = payload.len() >= 8;
        readers.push(tokio::spawn(async move {
            let mut received = 0u64;
            while received < count {
                match sub.recv().await {
                    Some(Ok(Event::Message(message))) => {
                        if checked {
                            let n = u64::from_le_bytes(message.payload[..8].try_into()?);
                            anyhow::ensure!(
                                n == received,
                                "message {n} arrived as number {received}: out of order"
                            );
                        }
                        received += 1;
                        if received.is_multiple_of(1024) {
                            bar.inc(1024);
                        }
                    }
                    Some(Ok(_)) => {}
                    Some(Err(err)) => return Err(anyhow::Error::from(err)),
                    None => anyhow::bail!("subscription ended"),
                }
            }
            Ok(())
        }));
    }
    let publisher = RemotePubSub::with_client(connect(url).await?).publisher();
    let started = Instant::now();
    match publishing {
        Publishing::Plain => {
            for n in 0..count {
                publisher.publish(&subject, numbered(&payload, n)).await?;
            }
        }
        Publishing::Batched => {
            let mut sent = 0;
            while sent < count {
                let n = (count - sent).min(256);
                publisher
                    .publish_batch(
                        (sent..sent + n).map(|i| (subject.clone(), numbered(&payload, i))),
                    )
                    .await?;
                sent += n;
            }
        }
    }
    publisher.flush().await?;
    for reader in readers {
        reader.await??;
    }
    bar.finish_and_clear();
    Ok((count * fan_out as u64) as f64 / started.elapsed().as_secs_f64())
}

async fn request(url: &str, count: u64, payload: bytes::Bytes) -> anyhow::Result<Histogram<u64>> {
    let subject = format!("bench-svc.echo{}", std::process::id());
    let service = RemotePubSub::with_client(connect(url).await?);
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
    let client = RemotePubSub::with_client(connect(url).await?);
    let mut histogram = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)?;
    let bar = progress(count, "request");
    for n in 0..count {
        let started = Instant::now();
        client
            .request(&subject, payload.clone(), Duration::from_secs(10))
            .await?;
        histogram.saturating_record(started.elapsed().as_nanos() as u64);
        if n.is_multiple_of(256) {
            bar.set_position(n);
        }
    }
    bar.finish_and_clear();
    responder.abort();
    Ok(histogram)
}

/// Rates of the queue workload, messages per second.
struct QueueFigures {
    /// `enqueue_batch` of 256 at a time, one batch after another.
    batched: f64,
    /// Single `enqueue` calls, [`QUEUE_OUTSTANDING`] in flight on the one
    /// connection (the host shares one fsync among those it writes together).
    pipelined: f64,
    /// Consume and ack of everything enqueued, acks in flight while the next
    /// deliveries arrive (the consumer sends them together).
    consume: f64,
}

/// Single enqueues in flight at once in the pipelined phase.
const QUEUE_OUTSTANDING: u64 = 256;

async fn queue(url: &str, count: u64, payload: bytes::Bytes) -> anyhow::Result<QueueFigures> {
    let name = format!("bench-{}", std::process::id());
    let queue = RemoteQueue::with_client(connect(url).await?, &name);
    let bar = progress(count, "enqueue");
    let started = Instant::now();
    let mut sent = 0;
    while sent < count {
        let n = (count - sent).min(256);
        queue
            .enqueue_batch(
                (0..n)
                    .map(|_| courier_queue::Message::new(payload.clone()))
                    .collect(),
            )
            .await?;
        sent += n;
        bar.set_position(sent);
    }
    let batched = count as f64 / started.elapsed().as_secs_f64();
    bar.finish_and_clear();
    let bar = progress(count, "pipelined");
    let started = Instant::now();
    let mut producers = tokio::task::JoinSet::new();
    for i in 0..QUEUE_OUTSTANDING.min(count) {
        let (queue, payload, bar) = (queue.clone(), payload.clone(), bar.clone());
        let mine = count / QUEUE_OUTSTANDING + u64::from(i < count % QUEUE_OUTSTANDING);
        producers.spawn(async move {
            for _ in 0..mine {
                queue
                    .enqueue(courier_queue::Message::new(payload.clone()))
                    .await?;
                bar.inc(1);
            }
            anyhow::Ok(())
        });
    }
    while let Some(done) = producers.join_next().await {
        done??;
    }
    let pipelined = count as f64 / started.elapsed().as_secs_f64();
    bar.finish_and_clear();
    let total = 2 * count;
    let bar = progress(total, "consume");
    let started = Instant::now();
    let mut consumer = queue.consumer(256).await?;
    let mut acks = tokio::task::JoinSet::new();
    for n in 0..total {
        let delivery = consumer.recv().await?;
        if acks.len() >= 256 {
            acks.join_next().await.expect("non-empty")??;
        }
        acks.spawn(delivery.ack());
        if n.is_multiple_of(256) {
            bar.set_position(n);
        }
    }
    while let Some(done) = acks.join_next().await {
        done??;
    }
    bar.finish_and_clear();
    Ok(QueueFigures {
        batched,
        pipelined,
        consume: total as f64 / started.elapsed().as_secs_f64(),
    })
}

/// The latency distribution as an SVG percentile plot (log-scaled tail).
fn latency_svg(histogram: &Histogram<u64>) -> String {
    let (width, height, margin) = (720.0, 360.0, 50.0);
    let quantiles: Vec<f64> = (0..=200)
        .map(|i| 1.0 - 10f64.powf(-(i as f64) / 50.0))
        .collect();
    let points: Vec<(f64, f64)> = quantiles
        .iter()
        .map(|q| (*q, histogram.value_at_quantile(*q) as f64 / 1000.0))
        .collect();
    let max = points.iter().map(|p| p.1).fold(1.0, f64::max);
    let x = |q: f64| margin + (-(1.0 - q).max(1e-4).log10() / 4.0) * (width - 2.0 * margin);
    let y = |us: f64| height - margin - us / max * (height - 2.0 * margin);
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"12\">\n<text x=\"{margin}\" y=\"20\">request-reply latency by percentile (µs)</text>\n<polyline fill=\"none\" stroke=\"#1f77b4\" stroke-width=\"2\" points=\""
    );
    for (q, us) in &points {
        let _ = write!(svg, "{:.1},{:.1} ", x(*q), y(*us));
    }
    svg.push_str("\"/>\n");
    for (label, q) in [
        ("p50", 0.5),
        ("p90", 0.9),
        ("p99", 0.99),
        ("p99.9", 0.999),
        ("p99.99", 0.9999),
    ] {
        let _ = writeln!(
            svg,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{label}</text>",
            x(q),
            height - margin + 18.0
        );
    }
    for fraction in [0.0, 0.5, 1.0] {
        let _ = writeln!(
            svg,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{:.0}</text>",
            margin - 6.0,
            y(max * fraction) + 4.0,
            max * fraction
        );
    }
    svg.push_str("</svg>\n");
    svg
}
