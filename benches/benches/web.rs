//! Browsers: what the WebSocket gateway (courier-web) costs beside a raw
//! WebSocket relay of the same JSON text, in the same run and placement.
//!
//! - `ws_stream_128B`: one WebSocket client publishes 128-byte `pub`
//!   frames (no `id`, so nothing is answered), another is subscribed and
//!   counts the `msg` frames. The raw baseline is a tokio-tungstenite
//!   server that forwards every text frame of the second connection to the
//!   first, unparsed. Both keep at most [`WINDOW`] messages between sender
//!   and receiver, below the gateway's per-subscription buffer, so the
//!   gateway's drop-oldest policy for slow browsers never drops one; a run
//!   that loses any reports the loss instead of a rate.
//! - `ws_request_64B`: sequential `req` frames answered by a service on
//!   the broker's bus (p50, p99), beside a raw WebSocket echo.
//!
//! Run with `cargo bench -p courier-benches --bench web`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use courier_benches::{
    filters, latency_histogram, median_and_spread, output_dir, record, run_pair, selected, Mode,
    Placement, Report,
};
use courier_pubsub::{Bus, Event, SubscribeOptions};
use courier_web::{Gateway, GatewayConfig};
use futures_util::{FutureExt, SinkExt, StreamExt};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;

/// Messages a sender may be ahead of its receiver (the gateway's bus
/// buffer per browser subscription is 256).
const WINDOW: u64 = 128;

/// Set by the client when it is done, so the server thread can stop.
static FINISHED: AtomicBool = AtomicBool::new(false);

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

fn announce_address(
    announce: &std::sync::mpsc::Sender<courier_transport::Address>,
    address: std::net::SocketAddr,
) {
    announce
        .send(format!("tcp://{address}").parse().expect("a tcp address"))
        .expect("the client waits for the address");
}

fn ws_url(address: &courier_transport::Address) -> String {
    match address {
        courier_transport::Address::Tcp { host, port } => format!("ws://{host}:{port}"),
        other => panic!("not a tcp address: {other}"),
    }
}

/// The gateway over a bus with an echo service on `bench.echo`.
async fn gateway(announce: std::sync::mpsc::Sender<courier_transport::Address>) {
    let bus = Bus::new();
    let mut echo = bus
        .subscribe("bench.echo", SubscribeOptions::default())
        .await
        .expect("subscribe");
    let replier = bus.publisher();
    let service = tokio::spawn(async move {
        while let Some(Ok(Event::Message(m))) = echo.recv().await {
            if let Some(reply) = &m.reply_to {
                let _ = replier
                    .publish_with_reply(
                        reply.as_str(),
                        None,
                        courier_wire::headers::Headers::new(),
                        m.payload,
                    )
                    .await;
            }
        }
    });
    let server = Gateway::new(bus, GatewayConfig::default())
        .bind("127.0.0.1:0", None)
        .await
        .expect("bind");
    announce_address(&announce, server.local_addr());
    while !FINISHED.load(Ordering::Acquire) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    server.shutdown(Duration::ZERO).await;
    service.abort();
}

/// The raw baseline: connections come in pairs (receiver, then sender)
/// for the stream, or alone for the echo (a connection whose first frame
/// is `echo`).
async fn relay(announce: std::sync::mpsc::Sender<courier_transport::Address>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    announce_address(&announce, listener.local_addr().expect("address"));
    let mut waiting: Option<tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>> = None;
    while !FINISHED.load(Ordering::Acquire) {
        let accepted = tokio::time::timeout(Duration::from_millis(5), listener.accept()).await;
        let Ok(Ok((stream, _))) = accepted else {
            continue;
        };
        let mut ws = tokio_tungstenite::accept_async(stream)
            .await
            .expect("handshake");
        let Some(Ok(first)) = ws.next().await else {
            continue;
        };
        if first.to_text().is_ok_and(|t| t == "echo") {
            tokio::spawn(async move {
                while let Some(Ok(m)) = ws.next().await {
                    if m.is_text() && ws.send(m).await.is_err() {
                        break;
                    }
                }
            });
            continue;
        }
        match waiting.take() {
            None => waiting = Some(ws),
            Some(mut receiver) => {
                tokio::spawn(async move {
                    while let Some(Ok(m)) = ws.next().await {
                        if !m.is_text() || receiver.feed(m).await.is_err() {
                            break;
                        }
                        // Whatever else has arrived goes in the same write.
                        while let Some(Some(Ok(m))) = ws.next().now_or_never() {
                            if receiver.feed(m).await.is_err() {
                                return;
                            }
                        }
                        if receiver.flush().await.is_err() {
                            break;
                        }
                    }
                });
            }
        }
    }
}

async fn text(ws: &mut Ws) -> String {
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) => return t.to_string(),
            Some(Ok(_)) => continue,
            other => panic!("connection ended: {other:?}"),
        }
    }
}

/// Opens a connection; on the gateway, says `connect` and waits for
/// `connected`; on the relay, sends `hello` (its first frame, ignored
/// beyond telling it from an echo).
async fn open(url: &str, gateway: bool, hello: &str) -> Ws {
    let (mut ws, _) = tokio_tungstenite::connect_async(url)
        .await
        .expect("connect");
    if gateway {
        ws.send(Message::text(r#"{"op":"connect","name":"bench"}"#))
            .await
            .expect("send");
        let answer = text(&mut ws).await;
        assert!(answer.contains("connected"), "{answer}");
    } else {
        ws.send(Message::text(hello.to_string()))
            .await
            .expect("send");
    }
    ws
}

/// Streams `count` messages; the time from the first send to the last
/// receipt, or `None` (loss reported) if any went missing.
async fn stream(url: String, gateway: bool, count: u64) -> Option<Duration> {
    let mut receiver = open(&url, gateway, "receiver").await;
    if gateway {
        receiver
            .send(Message::text(
                r#"{"op":"sub","id":1,"sid":"s","subject":"bench.stream"}"#,
            ))
            .await
            .expect("send");
        let answer = text(&mut receiver).await;
        assert!(answer.contains("\"ok\""), "{answer}");
    }
    let mut sender = open(&url, gateway, "sender").await;
    let payload = "x".repeat(128);
    let frame = if gateway {
        format!(r#"{{"op":"pub","subject":"bench.stream","data":"{payload}"}}"#)
    } else {
        format!(r#"{{"op":"msg","sid":"s","subject":"bench.stream","data":"{payload}"}}"#)
    };
    let received = Arc::new(AtomicU64::new(0));
    let progress = Arc::new(tokio::sync::Notify::new());
    let reader = {
        let (received, progress) = (received.clone(), progress.clone());
        tokio::spawn(async move {
            let mut n = 0u64;
            while n < count {
                match tokio::time::timeout(Duration::from_secs(2), receiver.next()).await {
                    Ok(Some(Ok(Message::Text(_)))) => {
                        n += 1;
                        received.store(n, Ordering::Release);
                        progress.notify_one();
                    }
                    Ok(Some(Ok(_))) => {}
                    _ => break,
                }
            }
            n
        })
    };
    let started = Instant::now();
    for sent in 0..count {
        while sent - received.load(Ordering::Acquire) >= WINDOW {
            sender.flush().await.expect("flush");
            progress.notified().await;
        }
        sender
            .feed(Message::text(frame.clone()))
            .await
            .expect("send");
    }
    sender.flush().await.expect("flush");
    let got = reader.await.expect("reader");
    let took = started.elapsed();
    FINISHED.store(true, Ordering::Release);
    if got < count {
        println!(
            "  {}: lost {} of {count} messages; no rate",
            if gateway { "gateway" } else { "raw relay" },
            count - got
        );
        return None;
    }
    Some(took)
}

/// `count` sequential round trips after `warmup`, as a latency histogram.
async fn round_trips(
    url: String,
    gateway: bool,
    warmup: u64,
    count: u64,
) -> hdrhistogram::Histogram<u64> {
    let mut ws = open(&url, gateway, "echo").await;
    let payload = "y".repeat(64);
    let mut histogram = latency_histogram();
    for i in 0..warmup + count {
        let frame = if gateway {
            format!(r#"{{"op":"req","id":{i},"subject":"bench.echo","data":"{payload}"}}"#)
        } else {
            format!(r#"{{"op":"reply","id":{i},"data":"{payload}"}}"#)
        };
        let started = Instant::now();
        ws.send(Message::text(frame)).await.expect("send");
        let answer = text(&mut ws).await;
        if i >= warmup {
            record(&mut histogram, started.elapsed());
        }
        assert!(answer.contains(&payload), "{answer}");
    }
    FINISHED.store(true, Ordering::Release);
    histogram
}

fn main() -> anyhow::Result<()> {
    let mode = Mode::from_args();
    let filters = filters();
    let mut report = Report::default();
    if selected(&filters, "ws_stream") {
        let count = mode.pick(200_000u64, 500);
        println!("ws_stream_128B: 1 -> 1 through the gateway beside a raw WebSocket relay, {count} messages");
        for place in Placement::available() {
            let rate = |gateway: bool| -> Option<f64> {
                let mut rates = Vec::new();
                for _ in 0..mode.pick(3, 1) {
                    FINISHED.store(false, Ordering::Release);
                    let took = if gateway {
                        run_pair(place, gateway_server, move |a| {
                            stream(ws_url(&a), true, count)
                        })
                    } else {
                        run_pair(place, relay, move |a| stream(ws_url(&a), false, count))
                    }?;
                    rates.push(count as f64 / took.as_secs_f64());
                }
                Some(median_and_spread(&mut rates).0)
            };
            if let (Some(courier), Some(raw)) = (rate(true), rate(false)) {
                println!(
                    "  {:<6} gateway {courier:>9.0} msgs/s, raw relay {raw:>9.0} msgs/s ({:.2}x raw)",
                    place.label(),
                    courier / raw
                );
                report.add("ws_stream_128B", "gateway", place, "msgs_per_s", courier);
                report.add("ws_stream_128B", "raw-ws", place, "msgs_per_s", raw);
                report.ratio(
                    "ws_stream_128B",
                    "gateway",
                    place,
                    courier / raw,
                    f64::NAN,
                    true,
                );
            }
        }
    }
    if selected(&filters, "ws_request") {
        let (warmup, count) = (mode.pick(1_000u64, 10), mode.pick(10_000u64, 100));
        println!("\nws_request_64B: sequential requests to a service on the bus beside a raw WebSocket echo");
        for place in Placement::available() {
            FINISHED.store(false, Ordering::Release);
            let courier = run_pair(place, gateway_server, move |a| {
                round_trips(ws_url(&a), true, warmup, count)
            });
            FINISHED.store(false, Ordering::Release);
            let raw = run_pair(place, relay, move |a| {
                round_trips(ws_url(&a), false, warmup, count)
            });
            let us = |h: &hdrhistogram::Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1e3;
            println!(
                "  {:<6} gateway p50 {:.1} µs p99 {:.1} µs, raw echo p50 {:.1} µs p99 {:.1} µs ({:.2}x raw at p50)",
                place.label(),
                us(&courier, 0.5),
                us(&courier, 0.99),
                us(&raw, 0.5),
                us(&raw, 0.99),
                us(&courier, 0.5) / us(&raw, 0.5)
            );
            for (subject, h) in [("gateway", &courier), ("raw-ws", &raw)] {
                report.add("ws_request_64B", subject, place, "p50_us", us(h, 0.5));
                report.add("ws_request_64B", subject, place, "p99_us", us(h, 0.99));
            }
            report.ratio(
                "ws_request_64B",
                "gateway",
                place,
                us(&courier, 0.5) / us(&raw, 0.5),
                f64::NAN,
                false,
            );
        }
    }
    println!("\n{}", report.ratio_table());
    let (tsv, svg) = report.write(&output_dir(mode), "web")?;
    println!("figures: {}\nplot:    {}", tsv.display(), svg.display());
    Ok(())
}

/// [`gateway`], named apart from the `gateway: bool` flags above.
async fn gateway_server(announce: std::sync::mpsc::Sender<courier_transport::Address>) {
    gateway(announce).await
}
