//! The state a node shares with its tasks: its endpoints (mailboxes and
//! responders, by name), its peers' drivers, the de-duplication inbox and
//! the schema cache. Held by the [`Node`](super::Node) handles and, weakly,
//! by the tasks serving incoming connections.

use std::any::Any;
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use courier_transport::Address;
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::config::NodeConfig;
use super::peer::Command;
use crate::protocol::Rejection;
use crate::schema::SchemaCache;
use crate::{Inbox, NodeId, Schema};

pub(super) type Handler = Arc<
    dyn Fn(&[u8]) -> Result<Pin<Box<dyn Future<Output = Bytes> + Send>>, Rejection> + Send + Sync,
>;
pub(super) type Decoder = fn(&[u8]) -> Result<Box<dyn Any + Send>, String>;

pub(super) struct Incoming {
    pub(super) from: NodeId,
    pub(super) body: Box<dyn Any + Send>,
}

pub(super) enum Endpoint {
    Mailbox {
        schema: Schema,
        decode: Decoder,
        tx: mpsc::Sender<Incoming>,
    },
    Responder {
        schema: Schema,
        reply_schema: Schema,
        handler: Handler,
    },
}

pub(super) struct PeerEntry {
    pub(super) commands: mpsc::Sender<Command>,
    /// Messages and requests the driver holds unfinished, kept current by it.
    pub(super) unfinished: Arc<AtomicUsize>,
}

impl PeerEntry {
    /// Unfinished work, counting commands still queued for the driver.
    pub(super) fn unfinished(&self) -> usize {
        let queued = self.commands.max_capacity() - self.commands.capacity();
        self.unfinished.load(Ordering::Relaxed) + queued
    }
}

pub(super) struct NodeInner {
    pub(super) id: NodeId,
    pub(super) incarnation: u64,
    pub(super) config: NodeConfig,
    pub(super) addresses: Vec<Address>,
    pub(super) endpoints: Mutex<HashMap<String, Endpoint>>,
    pub(super) peers: Mutex<HashMap<Address, PeerEntry>>,
    pub(super) inbox: Mutex<Inbox<(NodeId, u64)>>,
    pub(super) tasks: Mutex<Vec<JoinHandle<()>>>,
    /// Fingerprints traced once per type: tracing walks the whole type, and
    /// `request` would otherwise pay for it on every call.
    pub(super) schemas: Mutex<SchemaCache>,
}

impl NodeInner {
    pub(super) fn fingerprint<T: DeserializeOwned + 'static>(&self) -> u64 {
        lock(&self.schemas).get::<T>().fingerprint
    }
}

impl Drop for NodeInner {
    /// Dropping the last `Node` without [`Node::shutdown`] stops everything
    /// at once; what was unfinished is at least counted in the log.
    fn drop(&mut self) {
        let unfinished: usize = lock(&self.peers).values().map(PeerEntry::unfinished).sum();
        if unfinished > 0 {
            tracing::warn!(
                node = %self.id,
                unfinished,
                "node dropped without shutdown(): messages unacknowledged or requests unanswered were abandoned"
            );
        }
        for task in lock(&self.tasks).drain(..) {
            task.abort();
        }
    }
}

pub(super) fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poison| poison.into_inner())
}
