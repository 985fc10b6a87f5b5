//! `udp://`: one frame per datagram, CRC32C on every frame.
//!
//! A UDP listener turns each new peer address into a [`Connection`]; a
//! background task routes datagrams to them through bounded queues. Nothing
//! here retransmits: a datagram that is lost, corrupted (checksum fails) or
//! arrives when its queue is full is dropped and counted. Reliability is the
//! messaging layer's job.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use courier_wire::{EncodeError, Frame, FrameCodec};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;

use crate::connection::{RecvLink, SendLink};
use crate::listener::Counters;
use crate::{Address, ConnectError, Connection, RecvError, SendError, TransportConfig};

pub(crate) struct UdpWriter {
    socket: Arc<UdpSocket>,
    /// `None` when the socket is connected (client side).
    target: Option<SocketAddr>,
    codec: FrameCodec,
    closed: AtomicBool,
}

impl UdpWriter {
    pub(crate) async fn send(
        &self,
        encode: impl FnOnce(&FrameCodec, &mut BytesMut) -> Result<(), EncodeError>,
    ) -> Result<(), SendError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(SendError::Closed);
        }
        let mut datagram = BytesMut::new();
        encode(&self.codec, &mut datagram)?;
        match self.target {
            Some(target) => self.socket.send_to(&datagram, target).await?,
            None => self.socket.send(&datagram).await?,
        };
        Ok(())
    }

    /// Sends a control frame if the socket takes it now; drops it otherwise
    /// (datagrams are lossy anyway, and a pong must never wait or queue).
    pub(crate) fn try_send(&self, frame: &Frame) {
        if self.closed.load(Ordering::Acquire) {
            return;
        }
        let mut datagram = BytesMut::new();
        if self.codec.encode_frame(frame, &mut datagram).is_err() {
            return;
        }
        let _ = match self.target {
            Some(target) => self.socket.try_send_to(&datagram, target),
            None => self.socket.try_send(&datagram),
        };
    }

    pub(crate) fn codec_limit(&self) -> usize {
        self.codec.limit()
    }

    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::Release);
    }
}

enum Source {
    /// A connected client socket.
    Socket {
        socket: Arc<UdpSocket>,
        buf: Vec<u8>,
    },
    /// Datagrams routed by a listener's task.
    Routed(mpsc::Receiver<Bytes>),
}

pub(crate) struct UdpReader {
    source: Source,
    codec: FrameCodec,
    max_datagram: usize,
    discarded: u64,
}

impl UdpReader {
    pub(crate) fn discarded(&self) -> u64 {
        self.discarded
    }

    pub(crate) async fn recv(&mut self) -> Result<Option<Frame>, RecvError> {
        loop {
            let datagram = match &mut self.source {
                Source::Socket { socket, buf } => {
                    let n = socket.recv(buf).await?;
                    if n > self.max_datagram {
                        self.discarded += 1;
                        tracing::debug!(
                            size = n,
                            limit = self.max_datagram,
                            "discarded oversized datagram"
                        );
                        continue;
                    }
                    Bytes::copy_from_slice(&buf[..n])
                }
                Source::Routed(rx) => match rx.recv().await {
                    Some(datagram) => datagram,
                    None => return Ok(None),
                },
            };
            match self.codec.decode_datagram(datagram) {
                Ok(frame) => return Ok(Some(frame)),
                Err(reason) => {
                    self.discarded += 1;
                    tracing::debug!(%reason, "discarded datagram");
                }
            }
        }
    }
}

fn datagram_buffer(config: &TransportConfig) -> Vec<u8> {
    // One byte more than the limit, so an oversized datagram is seen as such
    // instead of being silently truncated by the kernel.
    vec![0u8; config.max_datagram_size + 1]
}

pub(crate) async fn connect(
    address: &Address,
    host: &str,
    port: u16,
    config: &TransportConfig,
) -> Result<Connection, ConnectError> {
    let resolve_err = |source| ConnectError::Resolve {
        address: address.clone(),
        source,
    };
    let target = tokio::net::lookup_host((host, port))
        .await
        .map_err(resolve_err)?
        .next()
        .ok_or_else(|| resolve_err(std::io::Error::other("no addresses found")))?;
    let local: SocketAddr = if target.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let io_err = |source| ConnectError::Io {
        address: address.clone(),
        source,
    };
    let socket = UdpSocket::bind(local).await.map_err(io_err)?;
    socket.connect(target).await.map_err(io_err)?;
    let socket = Arc::new(socket);
    let codec = config.datagram_codec();
    let writer = UdpWriter {
        socket: socket.clone(),
        target: None,
        codec,
        closed: AtomicBool::new(false),
    };
    let reader = UdpReader {
        source: Source::Socket {
            socket,
            buf: datagram_buffer(config),
        },
        codec,
        max_datagram: config.max_datagram_size,
        discarded: 0,
    };
    Ok(Connection::new(
        SendLink::Udp(writer),
        RecvLink::Udp(reader),
        config.heartbeat,
        Some(Address::udp(target)),
    ))
}

/// Routes datagrams from a bound socket to one connection per peer address.
pub(crate) async fn route(
    socket: Arc<UdpSocket>,
    incoming: mpsc::Sender<Connection>,
    config: TransportConfig,
    counters: Arc<Counters>,
) {
    let codec = config.datagram_codec();
    let mut peers: HashMap<SocketAddr, mpsc::Sender<Bytes>> = HashMap::new();
    let mut buf = datagram_buffer(&config);
    let dropped = |counters: &Counters| counters.dropped_datagrams.fetch_add(1, Ordering::Relaxed);
    loop {
        let (n, from) = match socket.recv_from(&mut buf).await {
            Ok(received) => received,
            Err(err) => {
                // Not expected on an unconnected socket; pause rather than
                // spin if the error persists.
                tracing::warn!(%err, "udp receive failed");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        if n > config.max_datagram_size {
            dropped(&counters);
            continue;
        }
        let mut datagram = Bytes::copy_from_slice(&buf[..n]);
        if let Some(queue) = peers.get(&from) {
            match queue.try_send(datagram) {
                Ok(()) => continue,
                Err(TrySendError::Full(_)) => {
                    dropped(&counters);
                    continue;
                }
                // The application dropped that connection; a new datagram
                // from the same address starts a new one.
                Err(TrySendError::Closed(back)) => {
                    peers.remove(&from);
                    datagram = back;
                }
            }
        }
        // A new peer must open with a valid frame, so noise creates nothing.
        if codec.decode_datagram(datagram.clone()).is_err() {
            dropped(&counters);
            continue;
        }
        if peers.len() >= config.max_udp_peers {
            peers.retain(|_, queue| !queue.is_closed());
            if peers.len() >= config.max_udp_peers {
                dropped(&counters);
                continue;
            }
        }
        let (queue, routed) = mpsc::channel(config.udp_peer_queue.max(1));
        let _ = queue.try_send(datagram);
        let writer = UdpWriter {
            socket: socket.clone(),
            target: Some(from),
            codec,
            closed: AtomicBool::new(false),
        };
        let reader = UdpReader {
            source: Source::Routed(routed),
            codec,
            max_datagram: config.max_datagram_size,
            discarded: 0,
        };
        let conn = Connection::new(
            SendLink::Udp(writer),
            RecvLink::Udp(reader),
            config.heartbeat,
            Some(Address::udp(from)),
        );
        match incoming.try_send(conn) {
            Ok(()) => {
                counters.accepted.fetch_add(1, Ordering::Relaxed);
                peers.insert(from, queue);
            }
            Err(TrySendError::Full(_)) => {
                dropped(&counters);
            }
            Err(TrySendError::Closed(_)) => return,
        }
    }
}

/// Binds a UDP socket and returns it with its local address.
pub(crate) async fn bind_socket(addr: SocketAddr) -> std::io::Result<(Arc<UdpSocket>, SocketAddr)> {
    let socket = UdpSocket::bind(addr).await?;
    let local = socket.local_addr()?;
    Ok((Arc::new(socket), local))
}
