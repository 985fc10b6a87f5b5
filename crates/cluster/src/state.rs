//! The replicated state machine of the metadata group: the key-value store
//! and the declarations, as pure data driven only by the commands applied.
//!
//! SKELETON: the API other modules build against; the implementation is in
//! progress (owned by the key-value work).

use serde::{Deserialize, Serialize};

use crate::types::{Command, Event, KeyValue, KvError, Response};

/// Everything the metadata group's log builds.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ClusterState {
    revision: u64,
}

/// A snapshot that cannot be read back.
#[derive(Debug, thiserror::Error)]
#[error("snapshot unreadable: {0}")]
pub struct SnapshotError(pub String);

impl ClusterState {
    /// Apply one command. Deterministic: the same commands in the same
    /// order give the same state and answers on every node.
    pub fn apply(&mut self, _command: &Command) -> Response {
        Response::None
    }

    /// The store's revision: how many changes it has seen.
    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// One key.
    pub fn get(&self, _key: &str) -> Option<&KeyValue> {
        None
    }

    /// Keys starting with `prefix`, in key order, at most `limit`.
    pub fn list(&self, _prefix: &str, _limit: usize) -> Vec<KeyValue> {
        Vec::new()
    }

    /// Changes to keys under `prefix` from revision `from` on, in revision
    /// order, at most `limit`.
    pub fn events_since(&self, _prefix: &str, _from: u64, _limit: usize) -> Result<Vec<Event>, KvError> {
        Ok(Vec::new())
    }

    /// The state as bytes, for a snapshot.
    pub fn to_snapshot(&self) -> Vec<u8> {
        postcard::to_allocvec(self).unwrap_or_default()
    }

    /// The state from a snapshot's bytes.
    pub fn from_snapshot(bytes: &[u8]) -> Result<ClusterState, SnapshotError> {
        postcard::from_bytes(bytes).map_err(|e| SnapshotError(e.to_string()))
    }
}
