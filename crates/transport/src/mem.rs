//! `mem://`: in-process connections. Frames move through bounded tokio
//! channels as values: no sockets, no serialization, no payload copies.
//! Fed frames travel in batches of up to 64, so streaming pays for one
//! channel operation and one wake-up per batch; a frame that is `send`-ed
//! goes at once.
//!
//! tokio's mpsc rather than crossbeam: both ends are awaited from async
//! tasks, and a crossbeam channel can only block a thread, so it would need
//! a notification layer of its own on top to wake a task. Whether that
//! combination could beat tokio's channel has not been measured.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock, Mutex};

use courier_wire::{Frame, FrameCodec};
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::{TryRecvError, TrySendError};

use crate::connection::{RecvLink, SendLink};
use crate::listener::Counters;
use crate::stream::Urgency;
use crate::{Address, BindError, ConnectError, Connection, SendError, TransportConfig};

/// What travels in a `mem://` channel.
pub(crate) enum Slot {
    One(Frame),
    /// Frames fed together: one channel operation, and one wake-up of the
    /// receiver, for up to [`BATCH`] frames.
    Batch(Vec<Frame>),
    /// The sender's orderly close.
    End,
}

/// Most frames fed before they are handed to the channel as one batch.
const BATCH: usize = 64;

pub(crate) struct MemWriter {
    tx: mpsc::Sender<Slot>,
    codec: FrameCodec,
    closed: AtomicBool,
    /// Frames fed but not yet in the channel. Frames enter the channel only
    /// while this lock is held, which keeps every task's frames in order.
    fed: Mutex<Vec<Frame>>,
}

impl MemWriter {
    fn fed(&self) -> std::sync::MutexGuard<'_, Vec<Frame>> {
        self.fed.lock().unwrap_or_else(|poison| poison.into_inner())
    }

    pub(crate) fn codec(&self) -> FrameCodec {
        self.codec
    }

    /// Takes one frame without waiting. Returns `true` when the channel is
    /// full and the caller must [`flush`](Self::flush) before the frame
    /// counts as sent (its frame is kept, in order, meanwhile).
    pub(crate) fn push(&self, frame: Frame, urgency: Urgency) -> Result<bool, SendError> {
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
        let mut fed = self.fed();
        fed.push(frame);
        if urgency == Urgency::Later && fed.len() < BATCH {
            return Ok(false);
        }
        let slot = if fed.len() == 1 {
            Slot::One(fed.pop().expect("one frame"))
        } else {
            Slot::Batch(std::mem::take(&mut *fed))
        };
        match self.tx.try_send(slot) {
            Ok(()) => Ok(false),
            Err(TrySendError::Closed(_)) => Err(SendError::Closed),
            Err(TrySendError::Full(slot)) => {
                *fed = match slot {
                    Slot::One(frame) => vec![frame],
                    Slot::Batch(frames) => frames,
                    Slot::End => unreachable!("only frames are pushed here"),
                };
                Ok(true)
            }
        }
    }

    /// Hands every fed frame to the channel, waiting for room.
    pub(crate) async fn flush(&self) -> Result<(), SendError> {
        loop {
            if self.fed().is_empty() {
                return Ok(());
            }
            let permit = self.tx.reserve().await.map_err(|_| SendError::Closed)?;
            // Taken and sent under one hold of the lock: released in
            // between, another send of the same task could overtake these
            // frames (a reordering this once had).
            let mut fed = self.fed();
            let frames = std::mem::take(&mut *fed);
            if !frames.is_empty() {
                permit.send(Slot::Batch(frames));
            }
            drop(fed);
        }
    }

    /// Best effort, never waits: for pongs.
    pub(crate) fn try_send(&self, frame: Frame) {
        let _ = self.tx.try_send(Slot::One(frame));
    }

    /// Refuses further frames, drops those not yet in the channel and tells
    /// the peer the stream ended, without waiting for room.
    pub(crate) fn abort(&self) {
        self.fed().clear();
        if !self.closed.swap(true, Ordering::AcqRel) {
            let _ = self.tx.try_send(Slot::End);
        }
    }

    pub(crate) async fn close(&self) -> Result<(), SendError> {
        self.flush().await?;
        if !self.closed.swap(true, Ordering::AcqRel) {
            let _ = self.tx.send(Slot::End).await;
        }
        Ok(())
    }
}

pub(crate) struct MemReader {
    rx: mpsc::Receiver<Slot>,
    batch: std::vec::IntoIter<Frame>,
    ended: bool,
}

impl MemReader {
    /// A frame that is already there: `Some(Some(frame))`, `Some(None)` at
    /// the end, `None` when the caller must wait.
    pub(crate) fn try_recv(&mut self) -> Option<Option<Frame>> {
        loop {
            if let Some(frame) = self.batch.next() {
                return Some(Some(frame));
            }
            if self.ended {
                return Some(None);
            }
            match self.rx.try_recv() {
                Ok(slot) => {
                    if let Some(frame) = self.take(slot) {
                        return Some(Some(frame));
                    }
                }
                Err(TryRecvError::Empty) => return None,
                Err(TryRecvError::Disconnected) => self.ended = true,
            }
        }
    }

    pub(crate) async fn recv(&mut self) -> Option<Frame> {
        loop {
            if let Some(next) = self.try_recv() {
                return next;
            }
            match self.rx.recv().await {
                Some(slot) => {
                    if let Some(frame) = self.take(slot) {
                        return Some(frame);
                    }
                }
                // Every sender dropped.
                None => self.ended = true,
            }
        }
    }

    fn take(&mut self, slot: Slot) -> Option<Frame> {
        match slot {
            Slot::One(frame) => Some(frame),
            Slot::Batch(frames) => {
                self.batch = frames.into_iter();
                None
            }
            Slot::End => {
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
            fed: Mutex::new(Vec::new()),
        },
        MemReader {
            rx,
            batch: Vec::new().into_iter(),
            ended: false,
        },
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
