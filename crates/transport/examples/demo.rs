//! Frames travelling over every transport, with the round-trip time of each,
//! and what happens to input that does not belong.
//!
//! Run with `cargo xtask demo` (or `cargo run --release -p courier-transport --example demo`).
//! Both ends run on one thread of one runtime, so the round trips below are
//! the cost of Courier and the kernel path, not of a cross-CPU wake-up.

use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use courier_transport::{bind, connect, Address, Frame, FrameKind, TransportConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const ROUND_TRIPS: usize = 5_000;
const STREAMED: u64 = 200_000;

struct Row {
    transport: &'static str,
    address: String,
    p50: Duration,
    p99: Duration,
    large: Duration,
    large_size: usize,
    streamed_per_sec: f64,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    println!("Courier transports demo: an echo server per transport, one client each.\n");
    let socket_path =
        std::env::temp_dir().join(format!("courier-demo-{}.sock", std::process::id()));
    let transports: [(&str, Address); 4] = [
        ("tcp", "tcp://127.0.0.1:0".parse()?),
        ("unix", Address::unix(&socket_path)),
        ("udp", "udp://127.0.0.1:0".parse()?),
        ("mem", "mem://demo".parse()?),
    ];
    let mut rows = Vec::new();
    for (name, address) in transports {
        let row = exercise(name, &address)
            .await
            .with_context(|| format!("{name} transport"))?;
        println!("  {name:<5} {:<28} ok", row.address);
        rows.push(row);
    }

    println!(
        "\n{:<6} {:>10} {:>10} {:>18} {:>16}",
        "link", "rtt p50", "rtt p99", "large frame rtt", "one-way frames/s"
    );
    for row in &rows {
        println!(
            "{:<6} {:>10} {:>10} {:>10} ({:>4} KiB) {:>16}",
            row.transport,
            micros(row.p50),
            micros(row.p99),
            micros(row.large),
            row.large_size / 1024,
            format!("{:.0}", row.streamed_per_sec),
        );
    }
    println!(
        "\n(64-byte frames, {ROUND_TRIPS} round trips; {STREAMED} frames of 128 bytes streamed one way; \
         udp streams with a credit window, as it has no flow control of its own.)"
    );

    hostile_input().await?;
    Ok(())
}

fn micros(d: Duration) -> String {
    format!("{:.1} µs", d.as_secs_f64() * 1e6)
}

async fn exercise(name: &'static str, address: &Address) -> anyhow::Result<Row> {
    let config = TransportConfig::default();
    let mut listener = bind(address, &config).await?;
    let bound = listener.local_addr().clone();
    tokio::spawn(async move {
        while let Ok(mut conn) = listener.accept().await {
            tokio::spawn(async move {
                let mut received = 0u64;
                while let Ok(Some(frame)) = conn.recv().await {
                    match frame.kind {
                        // Streamed frames are counted, and acknowledged in batches.
                        FrameKind::StreamItem => {
                            received += 1;
                            if received.is_multiple_of(256) || frame.id == STREAMED - 1 {
                                let _ = conn
                                    .send(Frame::new(FrameKind::Credit, received, Bytes::new()))
                                    .await;
                            }
                        }
                        _ => {
                            if conn.send(frame).await.is_err() {
                                break;
                            }
                        }
                    }
                }
            });
        }
    });

    let mut client = connect(&bound, &config).await?;
    let ping = Frame::data(0, vec![0xA5; 64]);
    let mut samples = Vec::with_capacity(ROUND_TRIPS);
    for i in 0..ROUND_TRIPS + 500 {
        let started = Instant::now();
        client.send(ping.clone()).await?;
        let echo = client.recv().await?.context("echo server hung up")?;
        anyhow::ensure!(echo == ping, "echo differs from what was sent");
        if i >= 500 {
            samples.push(started.elapsed());
        }
    }
    samples.sort();

    let large_size = if name == "udp" {
        60 * 1024
    } else {
        1024 * 1024
    };
    let large = Frame::data(1, vec![0x5A; large_size]);
    let started = Instant::now();
    let sender = client.sender();
    let (sent, echo) = tokio::join!(sender.send(large.clone()), client.recv());
    sent?;
    anyhow::ensure!(
        echo?.context("server hung up")? == large,
        "large echo differs"
    );
    let large_rtt = started.elapsed();

    // One-way streaming with a window of credit, so UDP does not overrun the
    // receiver: at most 1024 frames unacknowledged.
    let payload = Bytes::from(vec![0x3C; 128]);
    let started = Instant::now();
    let mut acknowledged = 0u64;
    let mut sent = 0u64;
    let (tx, mut rx) = client.split();
    while acknowledged < STREAMED {
        while sent < STREAMED && sent - acknowledged < 1024 {
            tx.feed(Frame::new(FrameKind::StreamItem, sent, payload.clone()))
                .await?;
            sent += 1;
        }
        tx.flush().await?;
        let credit = tokio::time::timeout(Duration::from_secs(2), rx.recv())
            .await
            .context("no credit within 2 s: frames lost")??
            .context("server hung up")?;
        acknowledged = acknowledged.max(credit.id);
    }
    let streamed_per_sec = STREAMED as f64 / started.elapsed().as_secs_f64();

    Ok(Row {
        transport: name,
        address: bound.to_string(),
        p50: samples[samples.len() / 2],
        p99: samples[samples.len() * 99 / 100],
        large: large_rtt,
        large_size,
        streamed_per_sec,
    })
}

/// What a stranger gets: an HTTP request to a Courier port, and a frame
/// larger than the peer's limit.
async fn hostile_input() -> anyhow::Result<()> {
    println!("\nInput that does not belong:");
    let config = TransportConfig::default();
    let listener = bind(&"tcp://127.0.0.1:0".parse()?, &config).await?;
    let Address::Tcp { port, .. } = listener.local_addr().clone() else {
        unreachable!()
    };
    let mut http = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    http.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await?;
    let mut reply = Vec::new();
    // The server hangs up with the rest of the request unread, so the kernel
    // may end the connection with a reset after the preamble: both are fine.
    let _ = http.read_to_end(&mut reply).await;
    while listener.stats().refused == 0 {
        tokio::task::yield_now().await;
    }
    println!(
        "  HTTP request to a Courier port: server replied {:?} and closed; listener refused {} connection(s)",
        String::from_utf8_lossy(&reply),
        listener.stats().refused
    );

    let small = TransportConfig::default().with_max_frame_size(1024);
    let mut small_listener = bind(&"mem://demo-limits".parse()?, &small).await?;
    let client = connect(small_listener.local_addr(), &small).await?;
    let err = client
        .send(Frame::data(1, vec![0; 4096]))
        .await
        .unwrap_err();
    println!("  4 KiB frame to a 1 KiB limit: {err}");
    client.send(Frame::data(2, &b"still usable"[..])).await?;
    let mut server = small_listener.accept().await?;
    let frame = server.recv().await?.context("frame")?;
    println!(
        "  next frame on the same connection: {:?}",
        String::from_utf8_lossy(&frame.payload)
    );
    Ok(())
}
