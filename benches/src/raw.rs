//! The raw baseline every end-to-end benchmark runs beside Courier: tokio
//! TCP with length-prefixed messages, one read and one write per message,
//! `TCP_NODELAY`, a 64 KiB buffered writer for streaming.

use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use courier_transport::Address;
use hdrhistogram::Histogram;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufWriter};
use tokio::net::{TcpListener, TcpStream};

use crate::{latency_histogram, record, run_pair, Placement};

async fn server(announce: std::sync::mpsc::Sender<Address>, mode: Mode) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    announce
        .send(Address::tcp(listener.local_addr().unwrap()))
        .unwrap();
    let (mut socket, _) = listener.accept().await.unwrap();
    socket.set_nodelay(true).unwrap();
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let mut received = 0u64;
    loop {
        while buf.len() >= 4 {
            let len = u32::from_le_bytes(buf[..4].try_into().unwrap()) as usize;
            if buf.len() < 4 + len {
                break;
            }
            let message = buf.split_to(4 + len);
            match mode {
                Mode::Echo => socket.write_all(&message).await.unwrap(),
                Mode::Count(total) => {
                    received += 1;
                    if received == total {
                        socket.write_all(&[1]).await.unwrap();
                    }
                }
            }
        }
        if buf.capacity() - buf.len() < 16 * 1024 {
            buf.reserve(64 * 1024);
        }
        if socket.read_buf(&mut buf).await.unwrap() == 0 {
            return;
        }
    }
}

#[derive(Clone, Copy)]
enum Mode {
    Echo,
    Count(u64),
}

fn message(size: usize) -> Bytes {
    let mut message = BytesMut::new();
    message.put_u32_le(size as u32);
    message.put_slice(&vec![0xA5; size]);
    message.freeze()
}

async fn connect(address: &Address) -> TcpStream {
    let Address::Tcp { host, port } = address else {
        unreachable!()
    };
    let socket = TcpStream::connect((host.as_str(), *port)).await.unwrap();
    socket.set_nodelay(true).unwrap();
    socket
}

/// Sequential round trips of `size`-byte messages; the histogram of their times.
pub fn pingpong(placement: Placement, size: usize, warmup: usize, count: usize) -> Histogram<u64> {
    run_pair(
        placement,
        |announce| server(announce, Mode::Echo),
        |address| async move {
            let mut socket = connect(&address).await;
            let message = message(size);
            let mut reply = vec![0u8; message.len()];
            let mut histogram = latency_histogram();
            for i in 0..warmup + count {
                let started = Instant::now();
                socket.write_all(&message).await.unwrap();
                socket.read_exact(&mut reply).await.unwrap();
                if i >= warmup {
                    record(&mut histogram, started.elapsed());
                }
            }
            histogram
        },
    )
}

/// `count` messages of `size` bytes one way; the time until the receiver has them all.
pub fn stream(placement: Placement, size: usize, count: u64) -> Duration {
    run_pair(
        placement,
        move |announce| server(announce, Mode::Count(count)),
        move |address| async move {
            let socket = connect(&address).await;
            let (mut read, write) = socket.into_split();
            let mut writer = BufWriter::with_capacity(64 * 1024, write);
            let message = message(size);
            let started = Instant::now();
            for _ in 0..count {
                writer.write_all(&message).await.unwrap();
            }
            writer.flush().await.unwrap();
            let mut done = [0u8; 1];
            read.read_exact(&mut done).await.unwrap();
            started.elapsed()
        },
    )
}

/// Round trips of `size`-byte messages with `window` outstanding at all
/// times (a pipelined client); the time for `count` of them.
pub fn pipelined(placement: Placement, size: usize, window: usize, count: u64) -> Duration {
    run_pair(
        placement,
        |announce| server(announce, Mode::Echo),
        move |address| async move {
            let socket = connect(&address).await;
            let (mut read, mut write) = socket.into_split();
            let message = message(size);
            let started = Instant::now();
            let mut reply = vec![0u8; message.len()];
            let mut sent = 0u64;
            let mut received = 0u64;
            while received < count {
                while sent < count && sent - received < window as u64 {
                    write.write_all(&message).await.unwrap();
                    sent += 1;
                }
                read.read_exact(&mut reply).await.unwrap();
                received += 1;
            }
            started.elapsed()
        },
    )
}
