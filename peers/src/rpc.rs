//! RPC echo of 64 bytes, server and client each on a pinned thread of one
//! process (as `courier-benches` runs every pair): Courier's `courier-rpc`
//! over tcp and shm, tarpc over TCP with bincode (the framing its examples
//! use), ZeroMQ REQ/REP for the sequential row, and a raw Unix-socket
//! ping-pong as the shm row's baseline.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use courier_benches::{latency_histogram, record, run_pair, Placement};
use courier_rpc::{Client, ClientConfig, Server, ServerConfig};
use courier_transport::Address;
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use hdrhistogram::Histogram;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub const SIZE: usize = 64;

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

#[tarpc::service]
trait TarpcEcho {
    async fn echo(data: Vec<u8>) -> Vec<u8>;
}

#[derive(Clone)]
struct TarpcEchoer;

impl TarpcEcho for TarpcEchoer {
    async fn echo(self, _: tarpc::context::Context, data: Vec<u8>) -> Vec<u8> {
        data
    }
}

/// Set by a Courier client when it is done, so its server thread stops.
/// `run_pair` joins both threads, so one run never sees another's flag.
static FINISHED: AtomicBool = AtomicBool::new(false);

async fn courier_server(announce: std::sync::mpsc::Sender<Address>, address: Address) {
    let listener = courier_transport::bind(&address, &Default::default())
        .await
        .expect("a loopback listener");
    let server = Server::new(ServerConfig::default())
        .service(EchoServer::new(Echoer))
        .spawn(listener);
    let _ = announce.send(server.local_addr().clone());
    while !FINISHED.load(Ordering::Acquire) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    server.shutdown(Duration::ZERO).await;
}

/// What a pair's client measures.
#[derive(Clone, Copy)]
pub enum Shape {
    /// One call at a time: `warmup` calls, then `count` timed ones.
    Sequential { warmup: u64, count: u64 },
    /// `window` calls in flight from one task, `count` in all.
    Windowed { window: usize, count: u64 },
}

/// What a pair measured.
pub enum Measured {
    Latency(Histogram<u64>),
    Rate(f64),
}

/// Courier RPC on `listen` (`tcp://127.0.0.1:0` or `shm://NAME`).
pub fn courier(placement: Placement, listen: Address, shape: Shape) -> anyhow::Result<Measured> {
    FINISHED.store(false, Ordering::Release);
    run_pair(
        placement,
        move |announce| courier_server(announce, listen),
        move |address| async move {
            let outcome = async {
                let echo =
                    EchoClient::new(Client::connect(&address, ClientConfig::default()).await?);
                measure(shape, |data| {
                    let echo = echo.clone();
                    async move { Ok(echo.echo(data).await?) }
                })
                .await
            }
            .await;
            FINISHED.store(true, Ordering::Release);
            outcome
        },
    )
}

/// tarpc over TCP with bincode, its defaults otherwise.
pub fn tarpc(placement: Placement, shape: Shape) -> anyhow::Result<Measured> {
    use tarpc::server::Channel;
    use tarpc::tokio_serde::formats::Bincode;
    run_pair(
        placement,
        |announce| async move {
            let mut incoming = tarpc::serde_transport::tcp::listen("127.0.0.1:0", Bincode::default)
                .await
                .expect("a loopback listener");
            let _ = announce.send(Address::tcp(incoming.local_addr()));
            if let Some(Ok(transport)) = incoming.next().await {
                tarpc::server::BaseChannel::with_defaults(transport)
                    .execute(TarpcEchoer.serve())
                    .for_each(|call| async move {
                        tokio::spawn(call);
                    })
                    .await;
            }
        },
        move |address| async move {
            let Address::Tcp { host, port } = address else {
                anyhow::bail!("tarpc's server announced {address}");
            };
            let transport =
                tarpc::serde_transport::tcp::connect((host.as_str(), port), Bincode::default)
                    .await?;
            let client = TarpcEchoClient::new(tarpc::client::Config::default(), transport).spawn();
            measure(shape, |data| {
                let client = client.clone();
                async move { Ok(client.echo(tarpc::context::current(), data).await?) }
            })
            .await
        },
    )
}

async fn measure<F, Fut>(shape: Shape, call: F) -> anyhow::Result<Measured>
where
    F: Fn(Vec<u8>) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Vec<u8>>>,
{
    let data = vec![0xA5u8; SIZE];
    match shape {
        Shape::Sequential { warmup, count } => {
            let mut histogram = latency_histogram();
            for i in 0..warmup + count {
                let started = Instant::now();
                let reply = call(data.clone()).await?;
                anyhow::ensure!(reply.len() == SIZE, "a reply of the wrong size");
                if i >= warmup {
                    record(&mut histogram, started.elapsed());
                }
            }
            Ok(Measured::Latency(histogram))
        }
        Shape::Windowed { window, count } => {
            let started = Instant::now();
            let mut in_flight = FuturesUnordered::new();
            let mut answered = 0u64;
            let mut sent = 0u64;
            while answered < count {
                while sent < count && in_flight.len() < window {
                    in_flight.push(call(data.clone()));
                    sent += 1;
                }
                let reply = in_flight.next().await.context("calls in flight")??;
                anyhow::ensure!(reply.len() == SIZE, "a reply of the wrong size");
                answered += 1;
            }
            Ok(Measured::Rate(
                count as f64 / started.elapsed().as_secs_f64(),
            ))
        }
    }
}

/// Raw Unix-socket ping-pong of `SIZE` bytes: the shm row's baseline.
pub fn unix_pingpong(
    placement: Placement,
    warmup: u64,
    count: u64,
) -> anyhow::Result<Histogram<u64>> {
    let path = std::env::temp_dir().join(format!("courier-peers-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let server_path = path.clone();
    let result = run_pair(
        placement,
        move |announce| async move {
            let listener = tokio::net::UnixListener::bind(&server_path).expect("a unix listener");
            let _ = announce.send(Address::Unix(server_path.clone()));
            let Ok((mut socket, _)) = listener.accept().await else {
                return;
            };
            let mut buf = [0u8; SIZE];
            while socket.read_exact(&mut buf).await.is_ok() {
                if socket.write_all(&buf).await.is_err() {
                    return;
                }
            }
        },
        move |address| async move {
            let Address::Unix(path) = address else {
                anyhow::bail!("the server announced {address}");
            };
            let mut socket = tokio::net::UnixStream::connect(&path).await?;
            let data = [0xA5u8; SIZE];
            let mut reply = [0u8; SIZE];
            let mut histogram = latency_histogram();
            for i in 0..warmup + count {
                let started = Instant::now();
                socket.write_all(&data).await?;
                socket.read_exact(&mut reply).await?;
                if i >= warmup {
                    record(&mut histogram, started.elapsed());
                }
            }
            Ok(histogram)
        },
    );
    let _ = std::fs::remove_file(&path);
    result
}

/// ZeroMQ (libzmq through the `zmq` crate) REQ/REP ping-pong of `SIZE`
/// bytes over TCP, each side a plain thread pinned as the placement says
/// (libzmq's I/O thread inherits its creator's CPU).
pub fn zeromq(placement: Placement, warmup: u64, count: u64) -> anyhow::Result<Histogram<u64>> {
    let (client_cpu, server_cpu) = match placement {
        Placement::Same => (0, 0),
        Placement::Split => (0, 1),
    };
    let pin = |cpu: usize| {
        if let Some(id) =
            core_affinity::get_core_ids().and_then(|ids| ids.into_iter().find(|id| id.id == cpu))
        {
            core_affinity::set_for_current(id);
        }
    };
    let done = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let (tx, rx) = std::sync::mpsc::channel();
        let done = &done;
        let server = scope.spawn(move || -> anyhow::Result<()> {
            pin(server_cpu);
            let context = zmq::Context::new();
            let socket = context.socket(zmq::REP)?;
            // Wakes now and then to see whether the client is done.
            socket.set_rcvtimeo(100)?;
            socket.bind("tcp://127.0.0.1:0")?;
            let endpoint = socket
                .get_last_endpoint()?
                .map_err(|_| anyhow::anyhow!("a non-UTF-8 endpoint"))?;
            let _ = tx.send(endpoint);
            let mut message = zmq::Message::new();
            while !done.load(Ordering::Acquire) {
                match socket.recv(&mut message, 0) {
                    Ok(()) => socket.send(&*message, 0)?,
                    Err(zmq::Error::EAGAIN) => continue,
                    Err(err) => return Err(err.into()),
                }
            }
            Ok(())
        });
        let client = scope.spawn(move || -> anyhow::Result<Histogram<u64>> {
            pin(client_cpu);
            let endpoint = rx.recv().context("the server's endpoint")?;
            let context = zmq::Context::new();
            let socket = context.socket(zmq::REQ)?;
            socket.connect(&endpoint)?;
            let data = [0xA5u8; SIZE];
            let mut reply = zmq::Message::new();
            let mut histogram = latency_histogram();
            for i in 0..warmup + count {
                let started = Instant::now();
                socket.send(&data[..], 0)?;
                socket.recv(&mut reply, 0)?;
                anyhow::ensure!(reply.len() == SIZE, "a reply of the wrong size");
                if i >= warmup {
                    record(&mut histogram, started.elapsed());
                }
            }
            Ok(histogram)
        });
        let result = client
            .join()
            .map_err(|_| anyhow::anyhow!("the ZeroMQ client panicked"));
        done.store(true, Ordering::Release);
        let served = server
            .join()
            .map_err(|_| anyhow::anyhow!("the ZeroMQ server panicked"));
        let histogram = result??;
        served??;
        Ok(histogram)
    })
}
