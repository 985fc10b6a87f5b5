//! RPC echo of 64 bytes: sequential round trips (p50/p99) beside raw TCP
//! ping-pong, and throughput with 32 calls in flight on one connection
//! beside a raw pipelined client, both in the same run and placement. The
//! 32 calls are made by 32 tasks (`echo_32_in_flight`) and by one task
//! polling 32 call futures (`echo_32_one_task`, as a peer's
//! benchmark makes them).
//!
//! Targets (issue 3): sequential round trip within 1.3x of raw.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::Poll;
use std::time::{Duration, Instant};

use courier_benches::{
    filters, latency_histogram, median_and_spread, output_dir, raw, record, run_pair, selected,
    Mode, Placement, Report,
};
use courier_rpc::{Client, ClientConfig, Server, ServerConfig};
use hdrhistogram::Histogram;

const SIZE: usize = 64;
const WINDOW: usize = 32;

#[courier_rpc::service]
trait Echo {
    async fn echo(&self, data: Vec<u8>) -> Vec<u8>;
}

struct Echoer;

impl Echo for Echoer {
    async fn echo(&self, data: Vec<u8>) -> Vec<u8> {
        data
    }
}

/// Whether the next run goes over `tls://` instead of `tcp://`.
static TLS: AtomicBool = AtomicBool::new(false);

fn client_config() -> ClientConfig {
    let mut config = ClientConfig::default();
    config.transport = courier_benches::client_transport(TLS.load(Ordering::Acquire));
    config
}

/// Set by the client when it is done, so the server thread can stop.
/// `run_pair` joins both threads, so one run never sees another's flag.
static FINISHED: AtomicBool = AtomicBool::new(false);

async fn server(announce: std::sync::mpsc::Sender<courier_transport::Address>) {
    let listener = courier_benches::loopback_listener(TLS.load(Ordering::Acquire)).await;
    let server = Server::new(ServerConfig::default())
        .service(EchoServer::new(Echoer))
        .spawn(listener);
    announce.send(server.local_addr().clone()).unwrap();
    while !FINISHED.load(Ordering::Acquire) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    server.shutdown(Duration::ZERO).await;
}

fn sequential(placement: Placement, warmup: usize, count: usize) -> Histogram<u64> {
    FINISHED.store(false, Ordering::Release);
    run_pair(placement, server, move |address| async move {
        let echo = EchoClient::new(Client::connect(&address, client_config()).await.unwrap());
        let data = vec![0xA5u8; SIZE];
        let mut histogram = latency_histogram();
        for i in 0..warmup + count {
            let started = Instant::now();
            let reply = echo.echo(data.clone()).await.unwrap();
            if i >= warmup {
                record(&mut histogram, started.elapsed());
            }
            debug_assert_eq!(reply.len(), SIZE);
        }
        FINISHED.store(true, Ordering::Release);
        histogram
    })
}

fn windowed(placement: Placement, count: u64) -> Duration {
    FINISHED.store(false, Ordering::Release);
    run_pair(placement, server, move |address| async move {
        let echo = EchoClient::new(Client::connect(&address, client_config()).await.unwrap());
        let data = vec![0xA5u8; SIZE];
        let started = Instant::now();
        let next = std::sync::Arc::new(AtomicU64::new(0));
        let workers: Vec<_> = (0..WINDOW)
            .map(|_| {
                let (echo, data, next) = (echo.clone(), data.clone(), next.clone());
                tokio::spawn(async move {
                    while next.fetch_add(1, Ordering::Relaxed) < count {
                        echo.echo(data.clone()).await.unwrap();
                    }
                })
            })
            .collect();
        for worker in workers {
            worker.await.unwrap();
        }
        let took = started.elapsed();
        FINISHED.store(true, Ordering::Release);
        took
    })
}

/// `count` calls from one task, keeping `WINDOW` call futures in flight and
/// polling them all whenever the task wakes.
fn one_task(placement: Placement, count: u64) -> Duration {
    FINISHED.store(false, Ordering::Release);
    run_pair(placement, server, move |address| async move {
        let echo = EchoClient::new(Client::connect(&address, client_config()).await.unwrap());
        let data = vec![0xA5u8; SIZE];
        let started = Instant::now();
        type Call<'a> = Pin<Box<dyn Future<Output = Result<Vec<u8>, courier_rpc::RpcError>> + 'a>>;
        let mut window: Vec<Call<'_>> = Vec::with_capacity(WINDOW);
        let (mut sent, mut done) = (0u64, 0u64);
        std::future::poll_fn(|cx| loop {
            while window.len() < WINDOW && sent < count {
                window.push(Box::pin(echo.echo(data.clone())));
                sent += 1;
            }
            let before = done;
            let mut i = 0;
            while i < window.len() {
                match window[i].as_mut().poll(cx) {
                    Poll::Ready(reply) => {
                        debug_assert_eq!(reply.unwrap().len(), SIZE);
                        drop(window.swap_remove(i));
                        done += 1;
                    }
                    Poll::Pending => i += 1,
                }
            }
            if done == count {
                return Poll::Ready(());
            }
            if done == before {
                return Poll::Pending;
            }
        })
        .await;
        let took = started.elapsed();
        FINISHED.store(true, Ordering::Release);
        took
    })
}

fn micros(histogram: &Histogram<u64>, quantile: f64) -> f64 {
    histogram.value_at_quantile(quantile) as f64 / 1000.0
}

fn main() -> anyhow::Result<()> {
    let mode = Mode::from_args();
    let repeats = mode.pick(3, 1);
    let warmup = mode.pick(2_000, 20);
    let count = mode.pick(20_000, 200);
    let calls = mode.pick(200_000u64, 2_000);
    let filters = filters();
    let mut report = Report::default();
    println!("rpc benchmarks ({mode:?}): echo of {SIZE} B\n");
    println!(
        "{:<18} {:<8} {:<6} {:>9} {:>9} {:>12} {:>8}",
        "workload", "subject", "place", "p50 µs", "p99 µs", "calls/s", "vs raw"
    );
    for placement in Placement::available() {
        if selected(&filters, "echo_sequential") {
            let mut raw_h = latency_histogram();
            let mut rpc_h = latency_histogram();
            for _ in 0..repeats {
                raw_h
                    .add(raw::pingpong(placement, SIZE, warmup, count))
                    .unwrap();
                rpc_h.add(sequential(placement, warmup, count)).unwrap();
            }
            let ratio = micros(&rpc_h, 0.5) / micros(&raw_h, 0.5);
            for (subject, h, r) in [("raw-tcp", &raw_h, None), ("rpc", &rpc_h, Some(ratio))] {
                println!(
                    "{:<18} {:<8} {:<6} {:>9.1} {:>9.1} {:>12} {:>8}",
                    "echo_sequential",
                    subject,
                    placement.label(),
                    micros(h, 0.5),
                    micros(h, 0.99),
                    "",
                    r.map_or(String::new(), |r| format!("{r:.2}x"))
                );
                report.add(
                    "echo_sequential",
                    subject,
                    placement,
                    "p50_us",
                    micros(h, 0.5),
                );
                report.add(
                    "echo_sequential",
                    subject,
                    placement,
                    "p99_us",
                    micros(h, 0.99),
                );
            }
            report.ratio("echo_sequential", "rpc", placement, ratio, 1.3, false);
        }
        type Workload = fn(Placement, u64) -> Duration;
        let in_flight: [(&str, Workload); 2] = [
            ("echo_32_in_flight", windowed),
            ("echo_32_one_task", one_task),
        ];
        let mut raw_rate = None;
        for (workload, run) in in_flight {
            if !selected(&filters, workload) {
                continue;
            }
            let rate = |took: Duration| calls as f64 / took.as_secs_f64();
            // One raw baseline for both (the same raw pipelined client).
            let raw_rate = *raw_rate.get_or_insert_with(|| {
                median_and_spread(
                    &mut (0..repeats)
                        .map(|_| rate(raw::pipelined(placement, SIZE, WINDOW, calls)))
                        .collect::<Vec<_>>(),
                )
                .0
            });
            let (rpc_rate, spread) = median_and_spread(
                &mut (0..repeats)
                    .map(|_| rate(run(placement, calls)))
                    .collect::<Vec<_>>(),
            );
            let ratio = rpc_rate / raw_rate;
            println!(
                "{:<18} {:<8} {:<6} {:>9} {:>9} {:>12.0}",
                workload,
                "raw-tcp",
                placement.label(),
                "",
                "",
                raw_rate
            );
            println!(
                "{:<18} {:<8} {:<6} {:>9} {:>9} {:>12.0} {:>7.2}x  (spread {:.0}%)",
                workload,
                "rpc",
                placement.label(),
                "",
                "",
                rpc_rate,
                ratio,
                spread * 100.0
            );
            report.add(workload, "raw-tcp", placement, "calls_per_s", raw_rate);
            report.add(workload, "rpc", placement, "calls_per_s", rpc_rate);
            report.ratio(workload, "rpc", placement, ratio, f64::NAN, true);
        }
    }
    if selected(&filters, "tls") {
        println!("\nTLS cost: the same echo over tls:// and tcp://, same run");
        for placement in Placement::available() {
            let over = |tls: bool| {
                TLS.store(tls, Ordering::Release);
                let mut h = latency_histogram();
                for _ in 0..repeats {
                    h.add(sequential(placement, warmup, count)).unwrap();
                }
                let rate = median_and_spread(
                    &mut (0..repeats)
                        .map(|_| calls as f64 / windowed(placement, calls).as_secs_f64())
                        .collect::<Vec<_>>(),
                )
                .0;
                (micros(&h, 0.5), rate)
            };
            let (plain_p50, plain_rate) = over(false);
            let (tls_p50, tls_rate) = over(true);
            TLS.store(false, Ordering::Release);
            println!(
                "  {:<6} round trip p50: tcp {plain_p50:.1} µs, tls {tls_p50:.1} µs ({:.2}x); 32 in flight: tcp {plain_rate:.0}/s, tls {tls_rate:.0}/s ({:.2}x)",
                placement.label(),
                tls_p50 / plain_p50,
                tls_rate / plain_rate
            );
            report.add("tls_echo_p50_us", "tcp", placement, "p50_us", plain_p50);
            report.add("tls_echo_p50_us", "tls", placement, "p50_us", tls_p50);
            report.add("tls_echo_32", "tcp", placement, "calls_per_s", plain_rate);
            report.add("tls_echo_32", "tls", placement, "calls_per_s", tls_rate);
        }
    }
    println!("\n{}", report.ratio_table());
    let (tsv, svg) = report.write(&output_dir(mode), "rpc")?;
    println!("figures: {}\nplot:    {}", tsv.display(), svg.display());
    Ok(())
}
