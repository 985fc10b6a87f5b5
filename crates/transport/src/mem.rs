//! `mem://`: in-process connections. Frames move through bounded tokio
//! channels as values: no sockets, no serialization, no payload copies.
//!
//! tokio's mpsc rather than crossbeam: both ends are awaited from async
//! tasks, and a crossbeam channel cannot wake a task without an extra
//! notification layer, which measured slower than tokio's own channel.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock, Mutex};

use bytes::BytesMut;
use courier_wire::{payload, EncodeError, Frame, FrameCodec, FrameKind, HEADER_LEN};
use serde::Serialize;
use tokio::sync::mpsc;

use crate::connection::{RecvLink, SendLink};
use crate::listener::Counters;
use crate::{Address, BindError, ConnectError, Connection, SendError, TransportConfig};

/// `None` in the channel is the sender's orderly close.
type Slot = Option<Frame>;

pub(crate) struct MemWriter {
    tx: mpsc::Sender<Slot>,
    codec: FrameCodec,
    closed: AtomicBool,
}

impl MemWriter {
    pub(crate) async fn send(&self, frame: Frame) -> Result<(), SendError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(SendError::Closed);
        }
        // Nothing is encoded, but the limit is the same as on the wire, so a
        // program behaves the same on mem:// as on tcp://.
        let size = frame.body_len();
        if size > self.codec.limit() {
            return Err(SendError::FrameTooLarge {
                size,
                limit: self.codec.limit(),
            });
        }
        self.tx
            .send(Some(frame))
            .await
            .map_err(|_| SendError::Closed)
    }

    /// Best effort, never waits: for pongs.
    pub(crate) fn try_send(&self, frame: Frame) {
        let _ = self.tx.try_send(Some(frame));
    }

    pub(crate) fn encode_message<T: Serialize + ?Sized>(
        &self,
        kind: FrameKind,
        id: u64,
        value: &T,
    ) -> Result<Frame, SendError> {
        let mut buf = BytesMut::new();
        match payload::encode_into(value, &mut buf, self.codec.max_payload_len()) {
            Ok(_) => Ok(Frame::new(kind, id, buf.freeze())),
            Err(EncodeError::FrameTooLarge { size, .. }) => Err(SendError::FrameTooLarge {
                size: size + HEADER_LEN,
                limit: self.codec.limit(),
            }),
            Err(other) => Err(other.into()),
        }
    }

    pub(crate) async fn close(&self) -> Result<(), SendError> {
        if !self.closed.swap(true, Ordering::AcqRel) {
            let _ = self.tx.send(None).await;
        }
        Ok(())
    }
}

pub(crate) struct MemReader {
    rx: mpsc::Receiver<Slot>,
    ended: bool,
}

impl MemReader {
    pub(crate) async fn recv(&mut self) -> Option<Frame> {
        if self.ended {
            return None;
        }
        match self.rx.recv().await {
            Some(Some(frame)) => Some(frame),
            // Closed by the peer, or every sender dropped.
            Some(None) | None => {
                self.ended = true;
                None
            }
        }
    }
}

fn link(capacity: usize, codec: FrameCodec) -> (MemWriter, MemReader) {
    let (tx, rx) = mpsc::channel(capacity.max(1));
    (
        MemWriter {
            tx,
            codec,
            closed: AtomicBool::new(false),
        },
        MemReader { rx, ended: false },
    )
}

struct Entry {
    incoming: mpsc::Sender<Connection>,
    counters: Arc<Counters>,
    /// The listener's own settings, for the server's side of each connection.
    config: TransportConfig,
}

static LISTENERS: LazyLock<Mutex<HashMap<String, Entry>>> = LazyLock::new(Default::default);

fn listeners() -> std::sync::MutexGuard<'static, HashMap<String, Entry>> {
    LISTENERS
        .lock()
        .unwrap_or_else(|poison| poison.into_inner())
}

/// Unregisters a `mem://` name when its listener is dropped.
pub(crate) struct MemRegistration {
    name: String,
    incoming: mpsc::Sender<Connection>,
}

impl Drop for MemRegistration {
    fn drop(&mut self) {
        let mut map = listeners();
        if map
            .get(&self.name)
            .is_some_and(|e| e.incoming.same_channel(&self.incoming))
        {
            map.remove(&self.name);
        }
    }
}

pub(crate) fn bind(
    address: &Address,
    name: &str,
    config: &TransportConfig,
    counters: Arc<Counters>,
) -> Result<(mpsc::Receiver<Connection>, MemRegistration), BindError> {
    let mut map = listeners();
    if map.get(name).is_some_and(|e| !e.incoming.is_closed()) {
        return Err(BindError::InUse {
            address: address.clone(),
        });
    }
    let (tx, rx) = mpsc::channel(config.accept_queue.max(1));
    map.insert(
        name.to_string(),
        Entry {
            incoming: tx.clone(),
            counters,
            config: config.clone(),
        },
    );
    Ok((
        rx,
        MemRegistration {
            name: name.to_string(),
            incoming: tx,
        },
    ))
}

pub(crate) async fn connect(
    address: &Address,
    name: &str,
    config: &TransportConfig,
) -> Result<Connection, ConnectError> {
    let (incoming, counters, server_config) = {
        let map = listeners();
        let entry = map.get(name).ok_or_else(|| ConnectError::NoListener {
            address: address.clone(),
        })?;
        (
            entry.incoming.clone(),
            entry.counters.clone(),
            entry.config.clone(),
        )
    };
    // A frame over either side's limit would end a socket connection; here
    // it is refused by the sender. Each direction is bounded by its
    // receiver's capacity, and each side's heartbeat is its own.
    let limit = config.max_frame_size.min(server_config.max_frame_size);
    let codec = FrameCodec::new().max_frame_size(limit);
    let (to_server, from_client) = link(server_config.mem_capacity, codec);
    let (to_client, from_server) = link(config.mem_capacity, codec);
    let peer = Some(address.clone());
    let server = Connection::new(
        SendLink::Mem(to_client),
        RecvLink::Mem(from_client),
        server_config.heartbeat,
        peer.clone(),
    );
    let client = Connection::new(
        SendLink::Mem(to_server),
        RecvLink::Mem(from_server),
        config.heartbeat,
        peer,
    );
    match tokio::time::timeout(config.connect_timeout, incoming.send(server)).await {
        Ok(Ok(())) => {
            counters.accepted.fetch_add(1, Ordering::Relaxed);
            Ok(client)
        }
        Ok(Err(_)) => Err(ConnectError::NoListener {
            address: address.clone(),
        }),
        Err(_) => Err(ConnectError::Timeout {
            address: address.clone(),
            after: config.connect_timeout,
        }),
    }
}
