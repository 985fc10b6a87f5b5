//! Publish–subscribe: routing cost with 100,000 subscriptions and memory
//! per subscription; delivery from 1 publisher to 1, 4 and 16 subscribers,
//! 128-byte messages, in process and through a host over TCP, beside raw
//! framed TCP streaming of the same messages in the same run; and across
//! two nodes joined by a route (publisher on one, subscribers on the
//! other) beside the same workload on one node, and request-reply across
//! nodes beside one node (p50, p99), all in the same run.
//!
//! Through the host, the publisher sends one-way batches of [`BATCH`]
//! messages (no round trip per batch; `flush` at the end reports anything
//! refused); subscriptions use backpressure, so nothing is dropped and
//! every message is counted at every subscriber.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use courier_benches::{
    filters, median_and_spread, output_dir, raw, run_pair, selected, Mode, Placement, Report,
};
use courier_pubsub::remote::{PubSubHost, PubSubServiceServer, RemotePubSub};
use courier_pubsub::route::{RouteConfig, RouteServiceServer, Routes};
use courier_pubsub::{Bus, Event, Filter, Router, SlowConsumer, Subject, SubscribeOptions};
use courier_rpc::{ClientConfig, Server, ServerConfig};

const BATCH: usize = 256;

/// Set by the client when it is done, so the host thread can stop.
static FINISHED: AtomicBool = AtomicBool::new(false);
/// Whether the next run goes over `tls://` instead of `tcp://`.
static TLS: AtomicBool = AtomicBool::new(false);

fn client_config() -> ClientConfig {
    let mut config = ClientConfig::default();
    config.transport = courier_benches::client_transport(TLS.load(Ordering::Acquire));
    config
}

async fn host(announce: std::sync::mpsc::Sender<courier_transport::Address>) {
    let listener = courier_benches::loopback_listener(TLS.load(Ordering::Acquire)).await;
    let server = Server::new(ServerConfig::default())
        .service(PubSubServiceServer::new(PubSubHost::new(Bus::new())))
        .spawn(listener);
    announce.send(server.local_addr().clone()).unwrap();
    while !FINISHED.load(Ordering::Acquire) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    server.shutdown(Duration::ZERO).await;
}

/// One publisher and `subscribers` subscribers (each on its own
/// connection) in the client thread, the host in the other.
fn remote(placement: Placement, subscribers: usize, count: u64) -> Duration {
    FINISHED.store(false, Ordering::Release);
    run_pair(placement, host, move |address| async move {
        let mut readers = Vec::new();
        for _ in 0..subscribers {
            let bus = RemotePubSub::connect(&address, client_config())
                .await
                .unwrap();
            let mut sub = bus
                .subscribe(
                    "bench.stream",
                    SubscribeOptions::default()
                        .buffer(4096)
                        .policy(SlowConsumer::Backpressure),
                )
                .await
                .unwrap();
            readers.push(tokio::spawn(async move {
                let mut received = 0u64;
                while received < count {
                    match sub.recv().await {
                        Some(Ok(Event::Message(_))) => received += 1,
                        other => panic!("{other:?}"),
                    }
                }
            }));
        }
        let publisher = RemotePubSub::connect(&address, client_config())
            .await
            .unwrap()
            .publisher();
        let payload = bytes::Bytes::from(vec![0xA5u8; SIZE]);
        let started = Instant::now();
        let mut sent = 0u64;
        while sent < count {
            let n = (count - sent).min(BATCH as u64);
            publisher
                .publish_batch((0..n).map(|_| ("bench.stream", payload.clone())))
                .await
                .unwrap();
            sent += n;
        }
        publisher.flush().await.unwrap();
        for reader in readers {
            reader.await.unwrap();
        }
        let took = started.elapsed();
        FINISHED.store(true, Ordering::Release);
        took
    })
}

const SIZE: usize = 128;

/// Messages the routes of the last `two_nodes` run dropped.
static ROUTE_DROPS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Two nodes, each a host with its own bus, joined by routes, both in the
/// server thread. Announces node 1 through `announce` and node 2 through
/// `second`.
async fn two_nodes(
    announce: std::sync::mpsc::Sender<courier_transport::Address>,
    second: std::sync::mpsc::Sender<courier_transport::Address>,
) {
    let mut servers = Vec::new();
    let mut routes = Vec::new();
    let mut addresses = Vec::new();
    for id in [1u64, 2] {
        let bus = Bus::new();
        let node_routes = Routes::new(bus.clone(), id, client_config(), RouteConfig::default());
        let listener = courier_benches::loopback_listener(false).await;
        let server = Server::new(ServerConfig::default())
            .service(PubSubServiceServer::new(PubSubHost::new(bus)))
            .service(RouteServiceServer::new(node_routes.host()))
            .spawn(listener);
        addresses.push(server.local_addr().clone());
        servers.push(server);
        routes.push(node_routes);
    }
    routes[0].set_peers([(2, addresses[1].clone())]);
    routes[1].set_peers([(1, addresses[0].clone())]);
    announce.send(addresses[0].clone()).unwrap();
    second.send(addresses[1].clone()).unwrap();
    while !FINISHED.load(Ordering::Acquire) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let drops = routes
        .iter()
        .flat_map(|r| r.stats())
        .map(|r| r.dropped)
        .sum();
    ROUTE_DROPS.store(drops, Ordering::Release);
    for server in servers {
        server.shutdown(Duration::ZERO).await;
    }
}

/// Publishes confirmed probes until `want` subscriptions take one: the
/// route knows the subscribers' interest then.
async fn wait_for_interest(bus: &RemotePubSub, want: u64) {
    let publisher = bus.publisher();
    for _ in 0..2000 {
        if publisher
            .publish_confirmed("bench.probe", "probe")
            .await
            .is_ok_and(|n| n >= want)
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("the subscribers' interest never reached the publisher's node");
}

/// 1 → `subscribers` with the publisher on node 1 and the subscribers on
/// node 2 (`cross`), or everything on node 1. Returns the time and the
/// fewest messages a subscriber got (less than `count`: loss, which the
/// caller reports instead of a rate).
fn across(placement: Placement, cross: bool, subscribers: usize, count: u64) -> (Duration, u64) {
    FINISHED.store(false, Ordering::Release);
    let (second_tx, second_rx) = std::sync::mpsc::channel();
    run_pair(
        placement,
        move |announce| two_nodes(announce, second_tx),
        move |first| async move {
            let second = second_rx.recv().unwrap();
            let home = if cross { second } else { first.clone() };
            let mut readers = Vec::new();
            for _ in 0..subscribers {
                let bus = RemotePubSub::connect(&home, client_config()).await.unwrap();
                let mut sub = bus
                    .subscribe(
                        "bench.>",
                        SubscribeOptions::default()
                            .buffer(4096)
                            .policy(SlowConsumer::Backpressure),
                    )
                    .await
                    .unwrap();
                readers.push(tokio::spawn(async move {
                    let mut received = 0u64;
                    while received < count {
                        // Quiet for a second: the rest was lost.
                        match tokio::time::timeout(Duration::from_secs(1), sub.recv()).await {
                            Ok(Some(Ok(Event::Message(m))))
                                if m.subject.as_str() == "bench.stream" =>
                            {
                                received += 1
                            }
                            Ok(Some(Ok(_))) => {}
                            _ => break,
                        }
                    }
                    received
                }));
            }
            let publishing = RemotePubSub::connect(&first, client_config())
                .await
                .unwrap();
            // Across, the subscribers' one filter is one interest (one route).
            let reach = if cross { 1 } else { subscribers as u64 };
            wait_for_interest(&publishing, reach).await;
            let publisher = publishing.publisher();
            let payload = bytes::Bytes::from(vec![0xA5u8; SIZE]);
            let started = Instant::now();
            let mut sent = 0u64;
            while sent < count {
                let n = (count - sent).min(BATCH as u64);
                publisher
                    .publish_batch((0..n).map(|_| ("bench.stream", payload.clone())))
                    .await
                    .unwrap();
                sent += n;
            }
            publisher.flush().await.unwrap();
            let mut fewest = count;
            for reader in readers {
                fewest = fewest.min(reader.await.unwrap());
            }
            let took = started.elapsed();
            FINISHED.store(true, Ordering::Release);
            (took, fewest)
        },
    )
}

/// Sequential request-reply, 64 B: the requester on node 1, the service
/// (one instance in a queue group) on node 2 (`cross`) or node 1.
fn request_reply(
    placement: Placement,
    cross: bool,
    warmup: usize,
    count: usize,
) -> hdrhistogram::Histogram<u64> {
    FINISHED.store(false, Ordering::Release);
    let (second_tx, second_rx) = std::sync::mpsc::channel();
    run_pair(
        placement,
        move |announce| two_nodes(announce, second_tx),
        move |first| async move {
            let second = second_rx.recv().unwrap();
            let home = if cross { second } else { first.clone() };
            let service = RemotePubSub::connect(&home, client_config()).await.unwrap();
            let mut requests = service
                .subscribe("bench.rr", SubscribeOptions::default().group("svc"))
                .await
                .unwrap();
            let responder = service.publisher();
            let serving = tokio::spawn(async move {
                while let Some(Ok(event)) = requests.recv().await {
                    if let Event::Message(request) = event {
                        let _ = responder.reply(&request, request.payload.clone()).await;
                    }
                }
            });
            let requester = RemotePubSub::connect(&first, client_config())
                .await
                .unwrap();
            let payload = bytes::Bytes::from(vec![0x5Au8; 64]);
            // The first requests also wait out the interest's propagation.
            for _ in 0..200 {
                if requester
                    .request("bench.rr", payload.clone(), Duration::from_secs(5))
                    .await
                    .is_ok()
                {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let mut histogram = courier_benches::latency_histogram();
            for i in 0..warmup + count {
                let started = Instant::now();
                requester
                    .request("bench.rr", payload.clone(), Duration::from_secs(5))
                    .await
                    .unwrap();
                if i >= warmup {
                    courier_benches::record(&mut histogram, started.elapsed());
                }
            }
            serving.abort();
            FINISHED.store(true, Ordering::Release);
            histogram
        },
    )
}

/// Resident memory of this process, in bytes (Linux).
fn resident_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

fn filter_for(n: u64) -> String {
    let (region, service, event) = (n % 50, (n / 50) % 40, (n / 2000) % 50);
    match n % 10 {
        0..=6 => format!("region{region}.service{service}.event{event}"),
        7 | 8 => format!("region{region}.*.event{event}"),
        _ => format!("region{region}.service{service}.>"),
    }
}

fn routing(subscriptions: u64, lookups: u64) -> (f64, f64, f64) {
    let before = resident_bytes();
    let mut router = Router::new();
    let filters: Vec<Filter> = (0..subscriptions)
        .map(|n| Filter::new(&filter_for(n)).unwrap())
        .collect();
    for (id, filter) in filters.iter().enumerate() {
        router.insert(filter, id as u64);
    }
    let per_subscription = (resident_bytes().saturating_sub(before)) as f64 / subscriptions as f64;
    let subjects: Vec<Subject> = (0..1000u64)
        .map(|n| {
            Subject::new(&format!(
                "region{}.service{}.event{}",
                n % 50,
                (n * 7) % 40,
                (n * 13) % 50
            ))
            .unwrap()
        })
        .collect();
    let mut out = Vec::new();
    let mut matched = 0u64;
    let started = Instant::now();
    for i in 0..lookups {
        out.clear();
        router.matches(&subjects[(i % 1000) as usize], &mut out);
        matched += out.len() as u64;
    }
    let per_lookup = started.elapsed().as_nanos() as f64 / lookups as f64;
    std::hint::black_box(&filters);
    (
        per_lookup,
        matched as f64 / lookups as f64,
        per_subscription,
    )
}

fn in_process(subscribers: usize, count: u64) -> Duration {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let bus = Bus::new();
        let readers: Vec<_> = (0..subscribers)
            .map(|_| {
                let mut sub = bus
                    .blocking_subscribe(
                        "bench.stream",
                        SubscribeOptions::default()
                            .buffer(4096)
                            .policy(SlowConsumer::Backpressure),
                    )
                    .unwrap();
                tokio::spawn(async move {
                    let mut received = 0u64;
                    while received < count {
                        match sub.recv().await {
                            Some(Ok(Event::Message(_))) => received += 1,
                            other => panic!("{other:?}"),
                        }
                    }
                })
            })
            .collect();
        let publisher = bus.publisher();
        let payload = bytes::Bytes::from(vec![0xA5u8; SIZE]);
        let subject = Subject::new("bench.stream").unwrap();
        let started = Instant::now();
        for _ in 0..count {
            publisher.publish_to(&subject, payload.clone()).await;
        }
        for reader in readers {
            reader.await.unwrap();
        }
        started.elapsed()
    })
}

fn main() -> anyhow::Result<()> {
    let mode = Mode::from_args();
    let filters = filters();
    let mut report = Report::default();
    let place = Placement::Same;
    println!("pub/sub benchmarks ({mode:?})\n");
    if selected(&filters, "routing") {
        let subscriptions = mode.pick(100_000, 2_000);
        let (ns, matched, bytes) = routing(subscriptions, mode.pick(2_000_000, 10_000));
        println!(
            "routing: {subscriptions} subscriptions (70% literal, 20% '*', 10% '>'): {ns:.0} ns per match ({matched:.1} matching each), ~{bytes:.0} bytes of memory per subscription"
        );
        report.add(
            "routing",
            &format!("{subscriptions}"),
            place,
            "ns_per_match",
            ns,
        );
        report.add(
            "routing",
            &format!("{subscriptions}"),
            place,
            "bytes_per_subscription",
            bytes,
        );
    }
    if selected(&filters, "in_process") {
        let count = mode.pick(500_000u64, 5_000);
        let repeats = mode.pick(3, 1);
        let rate = |took: Duration, fan: usize| (count * fan as u64) as f64 / took.as_secs_f64();
        let (raw_rate, _) = median_and_spread(
            &mut (0..repeats)
                .map(|_| count as f64 / raw::stream(place, SIZE, count).as_secs_f64())
                .collect::<Vec<_>>(),
        );
        println!("\nraw framed TCP streaming, {SIZE} B: {raw_rate:.0} msgs/s");
        report.add("stream_128B", "raw-tcp", place, "msgs_per_s", raw_rate);
        for fan in [1, 4, 16] {
            let (delivered, spread) = median_and_spread(
                &mut (0..repeats)
                    .map(|_| rate(in_process(fan, count), fan))
                    .collect::<Vec<_>>(),
            );
            let ratio = delivered / raw_rate;
            println!("in-process 1 -> {fan:>2}: {delivered:>12.0} delivered msgs/s ({ratio:.2}x raw TCP, spread {:.0}%)", spread * 100.0);
            report.add(
                "in_process_128B",
                &format!("1to{fan}"),
                place,
                "delivered_per_s",
                delivered,
            );
            report.ratio(
                "in_process_128B",
                &format!("1to{fan}"),
                place,
                ratio,
                f64::NAN,
                true,
            );
        }
    }
    if selected(&filters, "remote") {
        let count = mode.pick(200_000u64, 2_000);
        let repeats = mode.pick(3, 1);
        for place in Placement::available() {
            let (raw_rate, _) = median_and_spread(
                &mut (0..repeats)
                    .map(|_| count as f64 / raw::stream(place, SIZE, count).as_secs_f64())
                    .collect::<Vec<_>>(),
            );
            println!(
                "\nthrough a host over TCP ({}), raw framed TCP streaming {SIZE} B: {raw_rate:.0} msgs/s",
                place.label()
            );
            report.add(
                "stream_128B",
                "raw-tcp-beside-remote",
                place,
                "msgs_per_s",
                raw_rate,
            );
            for fan in [1, 4, 16] {
                let (delivered, spread) = median_and_spread(
                    &mut (0..repeats)
                        .map(|_| {
                            (count * fan as u64) as f64 / remote(place, fan, count).as_secs_f64()
                        })
                        .collect::<Vec<_>>(),
                );
                let ratio = delivered / raw_rate;
                println!("remote 1 -> {fan:>2}: {delivered:>12.0} delivered msgs/s ({ratio:.2}x raw TCP, spread {:.0}%)", spread * 100.0);
                report.add(
                    "remote_128B",
                    &format!("1to{fan}"),
                    place,
                    "delivered_per_s",
                    delivered,
                );
                report.ratio("remote_128B", &format!("1to{fan}"), place, ratio, 0.5, true);
            }
        }
    }
    if selected(&filters, "cross_node") {
        let count = mode.pick(200_000u64, 2_000);
        let repeats = mode.pick(3, 1);
        for place in Placement::available() {
            println!(
                "\nacross two nodes joined by a route ({}): publisher on node 1, subscribers on node 2, beside all on node 1",
                place.label()
            );
            for fan in [1, 4] {
                let rates = |cross: bool| -> Option<f64> {
                    let mut rates = Vec::new();
                    for _ in 0..repeats {
                        let (took, fewest) = across(place, cross, fan, count);
                        if fewest < count {
                            println!(
                                "  1 -> {fan} {}: LOSS, a subscriber got {fewest} of {count} (route drops {})",
                                if cross { "across" } else { "one node" },
                                ROUTE_DROPS.load(Ordering::Acquire)
                            );
                            return None;
                        }
                        rates.push((count * fan as u64) as f64 / took.as_secs_f64());
                    }
                    Some(median_and_spread(&mut rates).0)
                };
                let (single, cross) = (rates(false), rates(true));
                if let (Some(single), Some(cross)) = (single, cross) {
                    let ratio = cross / single;
                    println!(
                        "  1 -> {fan}: one node {single:>10.0} delivered msgs/s, across {cross:>10.0} ({ratio:.2}x one node)"
                    );
                    report.add(
                        "cross_node_128B",
                        &format!("1to{fan}-single"),
                        place,
                        "delivered_per_s",
                        single,
                    );
                    report.add(
                        "cross_node_128B",
                        &format!("1to{fan}"),
                        place,
                        "delivered_per_s",
                        cross,
                    );
                    // "vs raw" here is vs the same workload on one node.
                    report.ratio(
                        "cross_node_128B",
                        &format!("1to{fan}"),
                        place,
                        ratio,
                        0.5,
                        true,
                    );
                }
            }
            let (warmup, count) = (mode.pick(1000, 20), mode.pick(10_000, 200));
            let single = request_reply(place, false, warmup, count);
            let cross = request_reply(place, true, warmup, count);
            let us =
                |h: &hdrhistogram::Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
            println!(
                "  request-reply 64 B: one node p50 {:.1} µs p99 {:.1} µs; across p50 {:.1} µs p99 {:.1} µs ({:.2}x one node at p50)",
                us(&single, 0.5),
                us(&single, 0.99),
                us(&cross, 0.5),
                us(&cross, 0.99),
                us(&cross, 0.5) / us(&single, 0.5)
            );
            for (subject, h) in [("single", &single), ("across", &cross)] {
                report.add("cross_node_rr_64B", subject, place, "p50_us", us(h, 0.5));
                report.add("cross_node_rr_64B", subject, place, "p99_us", us(h, 0.99));
            }
            report.ratio(
                "cross_node_rr_64B",
                "p50",
                place,
                us(&cross, 0.5) / us(&single, 0.5),
                f64::NAN,
                false,
            );
        }
    }
    if selected(&filters, "tls") {
        let count = mode.pick(200_000u64, 2_000);
        println!("\nTLS cost: 1 -> 1 through a host, tls:// and tcp://, same run");
        for place in Placement::available() {
            let rate = |tls: bool| {
                TLS.store(tls, Ordering::Release);
                median_and_spread(
                    &mut (0..mode.pick(3, 1))
                        .map(|_| count as f64 / remote(place, 1, count).as_secs_f64())
                        .collect::<Vec<_>>(),
                )
                .0
            };
            let (plain, tls) = (rate(false), rate(true));
            TLS.store(false, Ordering::Release);
            println!(
                "  {:<6} tcp {plain:.0} msgs/s, tls {tls:.0} msgs/s ({:.2}x)",
                place.label(),
                tls / plain
            );
            report.add("tls_remote_128B", "tcp", place, "msgs_per_s", plain);
            report.add("tls_remote_128B", "tls", place, "msgs_per_s", tls);
        }
    }
    println!("\n{}", report.ratio_table());
    let (tsv, svg) = report.write(&output_dir(mode), "pubsub")?;
    println!("figures: {}\nplot:    {}", tsv.display(), svg.display());
    Ok(())
}
