//! Raft storage on Courier's own segment log: [`LogStore`] (openraft's
//! `RaftLogStorage`, storage-v2) and [`StateMachineStore`]
//! (`RaftStateMachine`, with [`SnapshotBuilder`]), both opened by [`open`].
//!
//! # On disk
//!
//! ```text
//! <dir>/log/       courier-queue's segment log (FsyncPolicy::Always)
//!                  record kind 0 at seq 0: the header "courier-raft-log/1"
//!                  record kind 1: one postcard-encoded openraft::Entry
//! <dir>/vote       "CVOT" crc32c(u32 LE) postcard(vote, last purged log id)
//! <dir>/snapshot   "CSNP" crc32c(u32 LE) postcard(SnapshotMeta, state bytes)
//! ```
//!
//! A queue group may keep its entries in the node's shared log instead of
//! `<dir>/log` ([`open_queue_group`], [`crate::wal`]); its vote, purge
//! point and snapshot stay here, with the file `<dir>/in-node-wal` saying
//! where its entries are.
//!
//! The Raft log index and the log's sequence number are different
//! numbers: entries are appended in index order, but after a purge past
//! the last entry (an installed snapshot) the next index jumps while the
//! sequence numbers run on. [`LogStore`] keeps the map from one to the
//! other, with the entries themselves, in a `BTreeMap` rebuilt on open by
//! replaying the log. Its memory therefore follows the unpurged log:
//! openraft purges entries once a snapshot covers them
//! (`Config::max_in_snapshot_log_to_keep`), and the store drops whole
//! segments below the first kept entry.
//!
//! The header record at sequence number 0 is never truncated: it lets
//! [`Log::truncate_after`] remove every entry, which keeps what comes
//! before the first removed one.
//!
//! `vote` and `snapshot` are replaced atomically: written to a temporary
//! file, fsynced, renamed over the old one, the directory fsynced. The
//! checksum catches a file damaged afterwards; a damaged file is an error,
//! never a guess (a vote read wrong could let this node vote twice in a
//! term).
//!
//! # What a crash can lose
//!
//! - Log entries: nothing whose append was reported flushed. An append
//!   calls openraft's callback only after its batch is written and
//!   fdatasynced (one `append_batch`, one fsync); a batch torn by a crash
//!   was never reported and is cut off on open.
//! - Vote and purge point: nothing; `save_vote` and `purge` return after
//!   the file is durable. The purge point is written before any segment is
//!   deleted, so a crash between leaves entries that are skipped on open.
//! - A truncation: nothing half done (see `courier_queue::log`: the log
//!   finishes an interrupted truncation on open).
//! - The state machine is not written on apply: after a restart it is the
//!   last snapshot, and openraft applies the committed entries after it
//!   again as it learns the commit index. Readers of [`SharedState`] see
//!   the state go back to the snapshot after a restart.
//! - A snapshot: nothing once it is built or installed (the file is durable
//!   before openraft hears of it, so it never purges entries that only an
//!   unwritten snapshot held).
//!
//! Everything read back is untrusted: unknown record kinds, undecodable
//! entries, indexes out of order, bad checksums and oversized files are
//! typed errors ([`StorageOpenError`] on open, openraft's
//! [`StorageError`] later). The log bounds every record (4 MiB), the vote
//! file is read up to 4 KiB and the snapshot file up to 1 GiB.

use std::fmt::Debug;
use std::fs::{self, File};
use std::io::{self, Cursor, Read, Write};
use std::ops::{Bound, RangeBounds};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard};

use bytes::Bytes;
use courier_queue::log::{
    AppendError, DurableImage, FsyncPolicy, Log, LogOptions, OpenError, Record, Seq, TruncateError,
};
use openraft::storage::{LogFlushed, RaftLogStorage, RaftStateMachine};
use openraft::{
    AnyError, BasicNode, Entry, EntryPayload, ErrorSubject, ErrorVerb, LogId, LogState,
    OptionalSend, RaftLogReader, RaftSnapshotBuilder, Snapshot, SnapshotMeta, StorageError,
    StorageIOError, StoredMembership, Vote,
};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::state::{ClusterState, SnapshotError};
use crate::types::{GroupId, NodeId, Response, TypeConfig};
use crate::wal::{GroupLog, NodeWal};

/// Record kind of the header at sequence number 0.
const HEADER_KIND: u8 = 0;
/// Record kind of a Raft entry.
const ENTRY_KIND: u8 = 1;
/// What the header record holds: the format of the records after it.
const HEADER: &[u8] = b"courier-raft-log/1";

const VOTE_FILE: &str = "vote";
const VOTE_MAGIC: &[u8; 4] = b"CVOT";
/// The vote file holds two small values; anything larger is not one.
const VOTE_LIMIT: u64 = 4 * 1024;

const SNAPSHOT_FILE: &str = "snapshot";
const SNAPSHOT_MAGIC: &[u8; 4] = b"CSNP";
/// The largest snapshot this node reads back or receives.
pub const SNAPSHOT_LIMIT: u64 = 1 << 30;

type Error = StorageError<NodeId>;
type Meta = SnapshotMeta<NodeId, BasicNode>;
type Membership = StoredMembership<NodeId, BasicNode>;
/// Raft index -> (log sequence number, entry).
use crate::wal::Index;

/// The file in a group's directory saying its entries are in the node's
/// shared log ([`NodeWal`]).
const IN_NODE_WAL: &str = "in-node-wal";

/// Why a file beside the log (vote, snapshot) could not be read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FileError {
    /// The system refused.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What the system said.
        source: io::Error,
    },
    /// The file is larger than such a file can be.
    #[error("{path} is larger than {limit} bytes")]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// The largest accepted.
        limit: u64,
    },
    /// The file is not what was written (bad magic, checksum or encoding).
    #[error("{path} is corrupt: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
}

/// Why [`open`] failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StorageOpenError {
    /// The segment log could not be opened.
    #[error("cannot open the Raft log: {0}")]
    Log(#[from] OpenError),
    /// The log holds corrupt records before its end: entries this node
    /// acknowledged may be gone, so it must not take part as if whole.
    #[error("the Raft log at {path} has corrupt records: {details}")]
    CorruptLog {
        /// The log directory.
        path: PathBuf,
        /// Each corruption with its segment and position.
        details: String,
    },
    /// A record of the log is readable but not a valid entry.
    #[error("record {seq} of the Raft log at {path} is invalid: {reason}")]
    BadRecord {
        /// The log directory.
        path: PathBuf,
        /// The record's sequence number.
        seq: Seq,
        /// What was wrong.
        reason: String,
    },
    /// The vote or snapshot file is unreadable.
    #[error(transparent)]
    File(#[from] FileError),
    /// The snapshot's state does not decode.
    #[error("the snapshot cannot be loaded: {0}")]
    Snapshot(#[from] SnapshotError),
    /// A fresh log's header could not be written.
    #[error("cannot write the Raft log's header: {0}")]
    Header(#[from] AppendError),
    /// A removed group's entries could not be dropped from the node's
    /// shared log before a new group of the same id opened.
    #[error("cannot drop a removed group's entries from the node log: {0}")]
    Forget(#[source] AppendError),
    /// Opening stopped (its blocking task panicked or was cancelled).
    #[error("opening the storage stopped: {0}")]
    Interrupted(String),
}

/// Opens (creating if needed) the storage in `dir`: the log in `dir/log`,
/// the `vote` and `snapshot` files beside it. Replays the log to rebuild
/// the index and loads the snapshot, if any, into the state machine.
pub async fn open(dir: &Path) -> Result<(LogStore, StateMachineStore), StorageOpenError> {
    open_group(dir).await
}

/// [`open`] for a group whose log builds `S` (a queue group's state, say):
/// the same files, the same guarantees.
pub async fn open_group<S: GroupState>(
    dir: &Path,
) -> Result<(LogStore, StateMachineStore<S>), StorageOpenError> {
    let dir = dir.to_path_buf();
    let opened = tokio::task::spawn_blocking(move || open_files(dir))
        .await
        .map_err(|e| StorageOpenError::Interrupted(e.to_string()))??;
    let Opened {
        dir,
        log,
        index,
        hard,
        next_seq,
        snapshot,
    } = opened;
    let next_seq = if next_seq == 0 {
        log.append(HEADER_KIND, Bytes::from_static(HEADER)).await? + 1
    } else {
        next_seq
    };
    let log_store = LogStore {
        dir: dir.clone(),
        backend: Backend::Own { log, next_seq },
        index: Arc::new(RwLock::new(index)),
        hard,
    };
    let state_machine = StateMachineStore::new(dir, snapshot)?;
    Ok((log_store, state_machine))
}

/// Whether the group whose directory is `dir` keeps its entries in the
/// node's shared log.
pub fn in_node_wal(dir: &Path) -> bool {
    dir.join(IN_NODE_WAL).exists()
}

/// Opens a queue group's storage in `dir`: its entries in the node's
/// shared log `wal` if given (see [`crate::wal`]), in a log of its own in
/// `dir/log` otherwise. A group that already has a log of its own keeps
/// it, so a node upgraded to the shared log reads its old groups; a group
/// whose entries are in the shared log cannot be opened without it.
pub async fn open_queue_group<S: GroupState>(
    dir: &Path,
    wal: Option<&NodeWal>,
    group: GroupId,
) -> Result<(LogStore, StateMachineStore<S>), StorageOpenError> {
    let owns_log = dir.join("log").exists();
    let in_wal = dir.join(IN_NODE_WAL).exists();
    match wal {
        Some(wal) if !owns_log => open_in_wal(dir, wal, group, in_wal).await,
        None if in_wal => Err(StorageOpenError::File(FileError::Corrupt {
            path: dir.join(IN_NODE_WAL),
            reason: "the group's entries are in the node's shared log, which is not open".into(),
        })),
        _ => open_group(dir).await,
    }
}

async fn open_in_wal<S: GroupState>(
    dir: &Path,
    wal: &NodeWal,
    group: GroupId,
    in_wal: bool,
) -> Result<(LogStore, StateMachineStore<S>), StorageOpenError> {
    if !in_wal {
        // Whatever the log holds for this id is a removed group's: a new
        // one must not find it.
        if wal.groups().contains(&group) {
            wal.forget(group).await.map_err(StorageOpenError::Forget)?;
        }
    }
    let dir = dir.to_path_buf();
    let (hard, snapshot) = {
        let dir = dir.clone();
        tokio::task::spawn_blocking(move || -> Result<_, FileError> {
            let side = read_side_files(&dir)?;
            if !in_wal {
                write_framed(&dir, IN_NODE_WAL, b"CWAL", &[])?;
            }
            Ok(side)
        })
        .await
        .map_err(|e| StorageOpenError::Interrupted(e.to_string()))??
    };
    let log = wal.group(group);
    {
        let _writing = log.write.lock().await;
        let purged = hard.purged.map(|id| id.index);
        let mut index = log.index.write().unwrap_or_else(|p| p.into_inner());
        if let Some(p) = purged {
            *index = match p.checked_add(1) {
                Some(from) => index.split_off(&from),
                None => Index::new(),
            };
        }
    }
    let log_store = LogStore {
        dir: dir.clone(),
        index: log.index.clone(),
        backend: Backend::Shared {
            wal: wal.clone(),
            group: log,
        },
        hard,
    };
    let state_machine = StateMachineStore::new(dir, snapshot)?;
    Ok((log_store, state_machine))
}

struct Opened {
    dir: PathBuf,
    log: Log,
    index: Index,
    hard: HardState,
    next_seq: Seq,
    snapshot: Option<(Meta, Vec<u8>)>,
}

/// Creates `dir` if needed, clears what an interrupted write left, and
/// reads the vote and snapshot files.
/// A snapshot as read from its file: its meta and its state's bytes.
type SnapshotFile = (Meta, Vec<u8>);

fn read_side_files(dir: &Path) -> Result<(HardState, Option<SnapshotFile>), FileError> {
    fs::create_dir_all(dir).map_err(|source| FileError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    // Leftovers of a write a crash interrupted; the file they were to
    // replace is intact.
    for name in [VOTE_FILE, SNAPSHOT_FILE, IN_NODE_WAL] {
        let temp = dir.join(format!("{name}.tmp"));
        match fs::remove_file(&temp) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => return Err(FileError::Io { path: temp, source }),
        }
    }
    let hard = read_hard_state(dir)?.unwrap_or_default();
    let snapshot = read_snapshot_file(dir)?;
    Ok((hard, snapshot))
}

fn open_files(dir: PathBuf) -> Result<Opened, StorageOpenError> {
    let (hard, snapshot) = read_side_files(&dir)?;

    let log_dir = dir.join("log");
    let purged = hard.purged.map(|id| id.index);
    let mut index = Index::new();
    let mut last_index: Option<u64> = None;
    let mut bad: Option<(Seq, String)> = None;
    let replay = |record: Record| {
        if bad.is_some() {
            return;
        }
        match decode_record(&record, last_index) {
            Ok(None) => {}
            Ok(Some(entry)) => {
                let at = entry.log_id.index;
                last_index = Some(at);
                if purged.is_none_or(|p| at > p) {
                    index.insert(at, (record.seq, entry));
                }
            }
            Err(reason) => bad = Some((record.seq, reason)),
        }
    };
    let options = LogOptions::default().with_fsync(FsyncPolicy::Always);
    let (log, recovery) = Log::open(&log_dir, options, replay)?;
    if let Some((seq, reason)) = bad {
        return Err(StorageOpenError::BadRecord {
            path: log_dir,
            seq,
            reason,
        });
    }
    if !recovery.corruption.is_empty() {
        let details = recovery
            .corruption
            .iter()
            .map(|c| {
                format!(
                    "{} at byte {}: {}",
                    c.segment.display(),
                    c.position,
                    c.reason
                )
            })
            .collect::<Vec<_>>()
            .join("; ");
        return Err(StorageOpenError::CorruptLog {
            path: log_dir,
            details,
        });
    }
    if recovery.truncated_bytes > 0 {
        // Under FsyncPolicy::Always a torn batch was never reported flushed.
        tracing::warn!(
            bytes = recovery.truncated_bytes,
            "cut a torn, unacknowledged batch off the Raft log"
        );
    }
    Ok(Opened {
        dir,
        log,
        index,
        hard,
        next_seq: recovery.next_seq,
        snapshot,
    })
}

/// One replayed record: `None` for the header, the entry otherwise. Entries
/// must come in increasing index order (`after` is the previous one's).
fn decode_record(record: &Record, after: Option<u64>) -> Result<Option<Entry<TypeConfig>>, String> {
    match record.kind {
        HEADER_KIND if record.seq == 0 && record.payload[..] == *HEADER => Ok(None),
        HEADER_KIND => Err("not the header of a Courier Raft log".to_string()),
        ENTRY_KIND if record.seq == 0 => Err("an entry where the header should be".to_string()),
        ENTRY_KIND => {
            let entry: Entry<TypeConfig> = postcard::from_bytes(&record.payload)
                .map_err(|e| format!("undecodable entry: {e}"))?;
            if let Some(previous) = after {
                if entry.log_id.index <= previous {
                    return Err(format!(
                        "entry index {} after index {previous}",
                        entry.log_id.index
                    ));
                }
            }
            Ok(Some(entry))
        }
        other => Err(format!("unknown record kind {other}")),
    }
}

/// What the `vote` file holds.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct HardState {
    vote: Option<Vote<NodeId>>,
    /// The last purged log id: `get_log_state` must report it after a
    /// restart, when the entries up to it are gone.
    purged: Option<LogId<NodeId>>,
}

fn read_hard_state(dir: &Path) -> Result<Option<HardState>, FileError> {
    let path = dir.join(VOTE_FILE);
    let Some(body) = read_framed(&path, VOTE_MAGIC, VOTE_LIMIT)? else {
        return Ok(None);
    };
    postcard::from_bytes(&body)
        .map(Some)
        .map_err(|e| FileError::Corrupt {
            path,
            reason: format!("undecodable: {e}"),
        })
}

fn write_hard_state(dir: &Path, hard: &HardState) -> Result<(), FileError> {
    let path = dir.join(VOTE_FILE);
    let body = postcard::to_allocvec(hard).map_err(|e| FileError::Corrupt {
        path: path.clone(),
        reason: format!("cannot encode: {e}"),
    })?;
    write_framed(dir, VOTE_FILE, VOTE_MAGIC, &body)
}

/// The snapshot file's meta and state bytes, if there is one.
fn read_snapshot_file(dir: &Path) -> Result<Option<(Meta, Vec<u8>)>, FileError> {
    let path = dir.join(SNAPSHOT_FILE);
    let Some(body) = read_framed(&path, SNAPSHOT_MAGIC, SNAPSHOT_LIMIT)? else {
        return Ok(None);
    };
    let (meta, data): (Meta, &[u8]) =
        postcard::from_bytes(&body).map_err(|e| FileError::Corrupt {
            path,
            reason: format!("undecodable: {e}"),
        })?;
    Ok(Some((meta, data.to_vec())))
}

fn encode_snapshot(meta: &Meta, data: &[u8]) -> Result<Vec<u8>, postcard::Error> {
    postcard::to_allocvec(&(meta, data))
}

/// Reads `[magic][crc32c of the body][body]`; `None` if there is no file.
fn read_framed(path: &Path, magic: &[u8; 4], limit: u64) -> Result<Option<Vec<u8>>, FileError> {
    let io_err = |source| FileError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(e)),
    };
    // Read at most one byte past the limit: the file's own size decides
    // the allocation, and never beyond the limit.
    let mut bytes = Vec::new();
    file.take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(io_err)?;
    if bytes.len() as u64 > limit {
        return Err(FileError::TooLarge {
            path: path.to_path_buf(),
            limit,
        });
    }
    let corrupt = |reason: &str| FileError::Corrupt {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    };
    if bytes.len() < 8 || bytes[..4] != magic[..] {
        return Err(corrupt("not a file of this kind (bad magic)"));
    }
    let crc = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
    if crc32c(&bytes[8..]) != crc {
        return Err(corrupt("checksum mismatch"));
    }
    bytes.drain(..8);
    Ok(Some(bytes))
}

/// Replaces `dir/name` atomically and durably with `[magic][crc][body]`.
fn write_framed(dir: &Path, name: &str, magic: &[u8; 4], body: &[u8]) -> Result<(), FileError> {
    let path = dir.join(name);
    let temp = dir.join(format!("{name}.tmp"));
    let io_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| FileError::Io { path, source }
    };
    let mut file = File::create(&temp).map_err(io_err(&temp))?;
    file.write_all(magic)
        .and_then(|()| file.write_all(&crc32c(body).to_le_bytes()))
        .and_then(|()| file.write_all(body))
        .and_then(|()| file.sync_all())
        .map_err(io_err(&temp))?;
    drop(file);
    fs::rename(&temp, &path).map_err(io_err(&path))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

/// CRC-32C (Castagnoli), the log's checksum.
fn crc32c(bytes: &[u8]) -> u32 {
    crc32c::crc32c(bytes)
}

/// Runs blocking file work off the async threads.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, FileError> + Send + 'static,
) -> Result<T, FileError> {
    tokio::task::spawn_blocking(work).await.unwrap_or_else(|e| {
        Err(FileError::Io {
            path: PathBuf::new(),
            source: io::Error::other(format!("file task stopped: {e}")),
        })
    })
}

fn storage_error(
    subject: ErrorSubject<NodeId>,
    verb: ErrorVerb,
    err: &(impl std::error::Error + 'static),
) -> Error {
    StorageIOError::new(subject, verb, AnyError::new(err)).into()
}

fn logs_error(verb: ErrorVerb, err: &(impl std::error::Error + 'static)) -> Error {
    storage_error(ErrorSubject::Logs, verb, err)
}

/// A protocol breach by the caller, as a storage error (openraft stops).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Refused(String);

/// Entries of `index` in `range`, whatever the bounds (never panics on an
/// empty or inverted range).
fn read_range(index: &RwLock<Index>, range: impl RangeBounds<u64>) -> Vec<Entry<TypeConfig>> {
    let start = match range.start_bound() {
        Bound::Included(&s) => s,
        Bound::Excluded(&s) => match s.checked_add(1) {
            Some(s) => s,
            None => return Vec::new(),
        },
        Bound::Unbounded => 0,
    };
    let end = match range.end_bound() {
        Bound::Included(&e) => e.checked_add(1).map_or(Bound::Unbounded, Bound::Excluded),
        Bound::Excluded(&e) => Bound::Excluded(e),
        Bound::Unbounded => Bound::Unbounded,
    };
    if let Bound::Excluded(e) = end {
        if e <= start {
            return Vec::new();
        }
    }
    let index = index.read().unwrap_or_else(|p| p.into_inner());
    index
        .range((Bound::Included(start), end))
        .map(|(_, (_, entry))| entry.clone())
        .collect()
}

/// The Raft log and vote of one node, on a [`Log`].
///
/// Appends are one `append_batch` each and return once fsynced, so every
/// write is serialized with the next, as openraft requires.
#[derive(Debug)]
pub struct LogStore {
    dir: PathBuf,
    backend: Backend,
    /// Shared with the [`LogReader`]s of replication tasks.
    index: Arc<RwLock<Index>>,
    hard: HardState,
}

/// Where a store's entries are written.
#[derive(Debug)]
enum Backend {
    /// A segment log of its own, in `dir/log`.
    Own {
        log: Log,
        /// The sequence number the log gives the next record.
        next_seq: Seq,
    },
    /// The node's shared log.
    Shared { wal: NodeWal, group: Arc<GroupLog> },
}

/// Reads the entries of a [`LogStore`] (for openraft's replication tasks).
#[derive(Clone, Debug)]
pub struct LogReader {
    index: Arc<RwLock<Index>>,
}

impl LogStore {
    /// FOR TESTS: what of the log's segments is known fsynced now (see
    /// [`Log::durable_image`]); apply it once the store is dropped to
    /// simulate a power loss. The vote and snapshot files are always
    /// durable once written, so they need no image.
    #[doc(hidden)]
    pub fn durable_image(&self) -> DurableImage {
        self.durable_probe().image()
    }

    /// FOR TESTS: takes [`Self::durable_image`] later, after the store has
    /// moved into Raft.
    #[doc(hidden)]
    pub fn durable_probe(&self) -> courier_queue::log::DurableProbe {
        match &self.backend {
            Backend::Own { log, .. } => log.durable_probe(),
            Backend::Shared { wal, .. } => wal.durable_probe(),
        }
    }

    /// The last index present, or the purge point when no entry is.
    fn last_log_id(&self) -> Option<LogId<NodeId>> {
        let index = self.index.read().unwrap_or_else(|p| p.into_inner());
        index
            .last_key_value()
            .map(|(_, (_, entry))| entry.log_id)
            .or(self.hard.purged)
    }

    async fn save_hard_state(&mut self, hard: HardState) -> Result<(), FileError> {
        let dir = self.dir.clone();
        let written = hard.clone();
        blocking(move || write_hard_state(&dir, &written)).await?;
        self.hard = hard;
        Ok(())
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, Error> {
        Ok(read_range(&self.index, range))
    }
}

impl RaftLogReader<TypeConfig> for LogReader {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, Error> {
        Ok(read_range(&self.index, range))
    }
}

/// Appends `entries` to a store's own log, one record each, in one batch
/// (one write, one fdatasync), then indexes them.
async fn append_own(
    log: &Log,
    next_seq: &mut Seq,
    index: &RwLock<Index>,
    entries: Vec<Entry<TypeConfig>>,
) -> Result<(), String> {
    let records = entries
        .iter()
        .map(|entry| postcard::to_allocvec(entry).map(|bytes| (ENTRY_KIND, Bytes::from(bytes))))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    let count = records.len() as u64;
    let first = log.append_batch(records).await.map_err(|e| e.to_string())?;
    let mut index = index.write().unwrap_or_else(|p| p.into_inner());
    for (seq, entry) in (first..).zip(entries) {
        index.insert(entry.log_id.index, (seq, entry));
    }
    *next_seq = first + count;
    Ok(())
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogReader;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, Error> {
        Ok(LogState {
            last_purged_log_id: self.hard.purged,
            last_log_id: self.last_log_id(),
        })
    }

    async fn get_log_reader(&mut self) -> LogReader {
        LogReader {
            index: self.index.clone(),
        }
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), Error> {
        let hard = HardState {
            vote: Some(*vote),
            ..self.hard.clone()
        };
        self.save_hard_state(hard)
            .await
            .map_err(|e| storage_error(ErrorSubject::Vote, ErrorVerb::Write, &e))
    }

    /// Reads the file again: what is durable is what counts.
    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, Error> {
        let dir = self.dir.clone();
        let hard = blocking(move || read_hard_state(&dir))
            .await
            .map_err(|e| storage_error(ErrorSubject::Vote, ErrorVerb::Read, &e))?;
        // A vote read back is never a *committed* one (a leadership): it
        // is handed back as the plain vote for the same node in the same
        // term. Otherwise a leader restarted from disk resumes leading its
        // old term at once, and two things go wrong:
        // - it does not know its commit index (it is not persisted), and a
        //   leader that resumes keeps its term's old no-op as its read
        //   fence, so a linearizable read could be answered from its
        //   snapshot, missing writes acknowledged before the crash;
        // - after a power loss it may have lost the unsynced tail of its
        //   own log, entries its followers already hold, and would then
        //   write different entries under the same log ids.
        // As a candidate it must win a new term instead, whose fresh no-op
        // fences reads and whose entries cannot collide with old ones. The
        // plain vote still binds it: it cannot vote for anyone else in
        // that term.
        Ok(hard.and_then(|h| h.vote).map(|mut vote| {
            vote.committed = false;
            vote
        }))
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), Error>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        // Entries at or below the purge point are already covered by a
        // snapshot: dropped here, as replay drops them (openraft's suite
        // appends some after a purge). The rest must go up from the last
        // entry: the map from index to sequence number relies on it, and
        // replay checks it.
        let purged = self.hard.purged.map(|id| id.index);
        let entries: Vec<Entry<TypeConfig>> = entries
            .into_iter()
            .filter(|e| purged.is_none_or(|p| e.log_id.index > p))
            .collect();
        let mut previous = self.last_log_id().map(|id| id.index);
        for entry in &entries {
            let at = entry.log_id.index;
            if let Some(previous) = previous.filter(|&p| at <= p) {
                let err = Refused(format!(
                    "append of index {at} after index {previous}: truncate first"
                ));
                callback.log_io_completed(Err(io::Error::other(err.to_string())));
                return Err(storage_error(
                    ErrorSubject::LogIndex(at),
                    ErrorVerb::Write,
                    &err,
                ));
            }
            previous = Some(at);
        }
        if entries.is_empty() {
            callback.log_io_completed(Ok(()));
            return Ok(());
        }
        let written = match &mut self.backend {
            Backend::Own { log, next_seq } => append_own(log, next_seq, &self.index, entries).await,
            Backend::Shared { wal, group } => {
                // Under the group's write lock, so a compaction copying
                // the group sees the index and the disk agree.
                let _writing = group.write.lock().await;
                let written = match wal.append_entries(group.id, &entries).await {
                    Ok(first) => {
                        let mut index = self.index.write().unwrap_or_else(|p| p.into_inner());
                        for (seq, entry) in (first..).zip(entries) {
                            index.insert(entry.log_id.index, (seq, entry));
                        }
                        Ok(())
                    }
                    Err(err) => Err(err.to_string()),
                };
                drop(_writing);
                wal.after_write();
                written
            }
        };
        match written {
            Ok(()) => {
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(err) => {
                callback.log_io_completed(Err(io::Error::other(err.clone())));
                Err(logs_error(ErrorVerb::Write, &Refused(err)))
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), Error> {
        let first_removed = {
            let index = self.index.read().unwrap_or_else(|p| p.into_inner());
            index.range(log_id.index..).next().map(|(_, (seq, _))| *seq)
        };
        let Some(first_removed) = first_removed else {
            return Ok(());
        };
        match &mut self.backend {
            Backend::Own { log, next_seq } => {
                // Sequence number 0 is the header, never an entry.
                let Some(keep) = first_removed.checked_sub(1) else {
                    let err = Refused("an entry at sequence number 0".to_string());
                    return Err(logs_error(ErrorVerb::Delete, &err));
                };
                log.truncate_after(keep)
                    .await
                    .map_err(|e: TruncateError| logs_error(ErrorVerb::Delete, &e))?;
                *next_seq = first_removed;
            }
            Backend::Shared { wal, group } => {
                let _writing = group.write.lock().await;
                wal.truncate(group.id, log_id.index)
                    .await
                    .map_err(|e| logs_error(ErrorVerb::Delete, &e))?;
                self.index
                    .write()
                    .unwrap_or_else(|p| p.into_inner())
                    .split_off(&log_id.index);
                return Ok(());
            }
        }
        self.index
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .split_off(&log_id.index);
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), Error> {
        if self.hard.purged.is_some_and(|p| log_id.index <= p.index) {
            return Ok(());
        }
        // The purge point first: a crash before the segments go leaves
        // entries that open skips.
        let hard = HardState {
            purged: Some(log_id),
            ..self.hard.clone()
        };
        let shared = match &self.backend {
            Backend::Shared { wal, group } => Some((wal.clone(), group.clone())),
            Backend::Own { .. } => None,
        };
        let writing = match &shared {
            Some((_, group)) => Some(group.write.lock().await),
            None => None,
        };
        self.save_hard_state(hard)
            .await
            .map_err(|e| logs_error(ErrorVerb::Write, &e))?;
        let first_kept = {
            let mut index = self.index.write().unwrap_or_else(|p| p.into_inner());
            *index = match log_id.index.checked_add(1) {
                Some(from) => index.split_off(&from),
                None => Index::new(),
            };
            index.first_key_value().map(|(_, (seq, _))| *seq)
        };
        drop(writing);
        match (&self.backend, shared) {
            // Segments go once no group of the node needs them.
            (_, Some((wal, _))) => wal.release().await,
            // Whole segments below the first kept entry (or, with none
            // kept, below the next record) go; the log never deletes its
            // tail.
            (Backend::Own { log, next_seq }, None) => log
                .remove_before(first_kept.unwrap_or(*next_seq))
                .await
                .map(drop)
                .map_err(|e| logs_error(ErrorVerb::Delete, &e))?,
            (Backend::Shared { .. }, None) => {}
        }
        Ok(())
    }
}

/// What a Raft group's log builds, applied in log order on every member.
///
/// Every group shares one [`TypeConfig`] (so one connection, one network
/// and one log format carry them all); a group answers a command meant for
/// another kind of group without changing anything.
pub trait GroupState: Clone + Debug + Send + Sync + 'static {
    /// The state before any entry.
    fn empty() -> Self;
    /// Applies one command. Deterministic: no clock, no randomness, no
    /// iteration over unordered maps that reaches the result.
    fn apply(&mut self, command: &crate::types::Command) -> Response;
    /// The whole state as bytes.
    fn to_snapshot(&self) -> Vec<u8>;
    /// The state from [`GroupState::to_snapshot`]'s bytes; anything else is
    /// an error, never a panic.
    fn from_snapshot(bytes: &[u8]) -> Result<Self, SnapshotError>;
    /// A number that moves whenever applying changed what readers watch.
    fn revision(&self) -> u64;
}

impl GroupState for ClusterState {
    fn empty() -> Self {
        ClusterState::default()
    }
    fn apply(&mut self, command: &crate::types::Command) -> Response {
        ClusterState::apply(self, command)
    }
    fn to_snapshot(&self) -> Vec<u8> {
        ClusterState::to_snapshot(self)
    }
    fn from_snapshot(bytes: &[u8]) -> Result<Self, SnapshotError> {
        ClusterState::from_snapshot(bytes)
    }
    fn revision(&self) -> u64 {
        ClusterState::revision(self)
    }
}

/// The replicated state and what readers share of it. Cheap to clone.
///
/// The state is updated before the applied index is published, so once
/// [`SharedState::last_applied_index`] is at least `i`, [`SharedState::read`]
/// reflects entry `i`.
#[derive(Debug)]
pub struct SharedState<S = ClusterState> {
    state: Arc<RwLock<S>>,
    /// Last applied index + 1; 0 when nothing is applied.
    applied: Arc<AtomicU64>,
    revision: watch::Receiver<u64>,
    applied_bytes: Arc<AtomicU64>,
}

impl<S> Clone for SharedState<S> {
    fn clone(&self) -> Self {
        SharedState {
            state: self.state.clone(),
            applied: self.applied.clone(),
            revision: self.revision.clone(),
            applied_bytes: self.applied_bytes.clone(),
        }
    }
}

impl<S> SharedState<S> {
    /// Bytes of commands applied since this node started (to ask for a
    /// snapshot by size, not only by entry count).
    pub fn applied_bytes(&self) -> u64 {
        self.applied_bytes.load(Ordering::Relaxed)
    }

    /// The state as it is now. Hold the guard briefly: applying waits for it.
    pub fn read(&self) -> RwLockReadGuard<'_, S> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Wakes on every change of the store's revision
    /// ([`GroupState::revision`]); fails once the state machine is gone.
    pub fn revision_watch(&self) -> watch::Receiver<u64> {
        let mut receiver = self.revision.clone();
        receiver.mark_unchanged();
        receiver
    }

    /// The index of the last entry applied (or covered by the snapshot the
    /// state came from), if any.
    pub fn last_applied_index(&self) -> Option<u64> {
        self.applied.load(Ordering::Acquire).checked_sub(1)
    }
}

/// The snapshot file, written by one task at a time.
#[derive(Debug)]
struct SnapshotFiles {
    dir: PathBuf,
    /// The current snapshot's meta; held while the file is written or read.
    current: tokio::sync::Mutex<Option<Meta>>,
    /// Makes snapshot ids unique (`{last index}-{term}-{counter}`).
    counter: AtomicU64,
}

impl SnapshotFiles {
    /// Writes the snapshot file, unless `only_if_newer` and the current
    /// one covers more of the log (a build that raced an install).
    async fn save(&self, meta: &Meta, data: &[u8], only_if_newer: bool) -> Result<(), Error> {
        let write_error = |e: &dyn std::error::Error| {
            Error::from(StorageIOError::write_snapshot(
                Some(meta.signature()),
                AnyError::error(e.to_string()),
            ))
        };
        let mut current = self.current.lock().await;
        if only_if_newer
            && current
                .as_ref()
                .is_some_and(|c| c.last_log_id > meta.last_log_id)
        {
            return Ok(());
        }
        let body = encode_snapshot(meta, data).map_err(|e| write_error(&e))?;
        let dir = self.dir.clone();
        blocking(move || write_framed(&dir, SNAPSHOT_FILE, SNAPSHOT_MAGIC, &body))
            .await
            .map_err(|e| write_error(&e))?;
        *current = Some(meta.clone());
        Ok(())
    }

    async fn load(&self) -> Result<Option<(Meta, Vec<u8>)>, Error> {
        let _current = self.current.lock().await;
        let dir = self.dir.clone();
        blocking(move || read_snapshot_file(&dir))
            .await
            .map_err(|e| StorageIOError::read_snapshot(None, AnyError::error(e.to_string())).into())
    }

    fn next_id(&self, last: Option<LogId<NodeId>>) -> String {
        let counter = self.counter.fetch_add(1, Ordering::Relaxed);
        match last {
            Some(id) => format!("{}-{}-{counter}", id.index, id.leader_id.term),
            None => format!("none-0-{counter}"),
        }
    }
}

/// Roughly the bytes a command holds (its keys and values).
fn command_size(command: &crate::types::Command) -> u64 {
    use crate::types::{Command, KvCommand};
    let kv = |c: &KvCommand| match c {
        KvCommand::Put { key, value, .. } => (key.len() + value.len()) as u64,
        KvCommand::Delete { key, .. } => key.len() as u64,
        _ => 16,
    };
    match command {
        Command::Kv(c) => kv(c),
        Command::KvBatch(cs) => cs.iter().map(kv).sum(),
        Command::Meta(_) => 64,
        Command::Queue(cs) => cs.iter().map(crate::queue_state::QueueCommand::size).sum(),
    }
}

/// The state machine of one group (the metadata group's by default).
#[derive(Debug)]
pub struct StateMachineStore<S = ClusterState> {
    state: Arc<RwLock<S>>,
    applied: Arc<AtomicU64>,
    applied_bytes: Arc<AtomicU64>,
    last_applied: Option<LogId<NodeId>>,
    membership: Membership,
    revision: watch::Sender<u64>,
    revision_rx: watch::Receiver<u64>,
    snapshots: Arc<SnapshotFiles>,
}

impl<S: GroupState> StateMachineStore<S> {
    fn new(
        dir: PathBuf,
        snapshot: Option<(Meta, Vec<u8>)>,
    ) -> Result<StateMachineStore<S>, StorageOpenError> {
        let (state, last_applied, membership, current, counter) = match snapshot {
            Some((meta, data)) => {
                let state = S::from_snapshot(&data)?;
                // Ids go on from the loaded one's counter, so they stay
                // unique across restarts.
                let counter = meta
                    .snapshot_id
                    .rsplit('-')
                    .next()
                    .and_then(|c| c.parse::<u64>().ok())
                    .map_or(0, |c| c.saturating_add(1));
                (
                    state,
                    meta.last_log_id,
                    meta.last_membership.clone(),
                    Some(meta),
                    counter,
                )
            }
            None => (S::empty(), None, Membership::default(), None, 0),
        };
        let (revision, revision_rx) = watch::channel(state.revision());
        let applied = Arc::new(AtomicU64::new(last_applied.map_or(0, |id| id.index + 1)));
        Ok(StateMachineStore {
            state: Arc::new(RwLock::new(state)),
            applied,
            applied_bytes: Arc::default(),
            last_applied,
            membership,
            revision,
            revision_rx,
            snapshots: Arc::new(SnapshotFiles {
                dir,
                current: tokio::sync::Mutex::new(current),
                counter: AtomicU64::new(counter),
            }),
        })
    }

    /// What readers share: the state, its revision and the applied index.
    /// Take it before the store moves into `Raft::new`.
    pub fn shared(&self) -> SharedState<S> {
        SharedState {
            state: self.state.clone(),
            applied: self.applied.clone(),
            revision: self.revision_rx.clone(),
            applied_bytes: self.applied_bytes.clone(),
        }
    }

    /// Publishes the applied index and the revision after the state changed.
    fn publish(&self, revision: u64) {
        self.applied.store(
            self.last_applied.map_or(0, |id| id.index + 1),
            Ordering::Release,
        );
        self.revision.send_if_modified(|current| {
            let changed = *current != revision;
            *current = revision;
            changed
        });
    }
}

/// Builds a snapshot of the state as it was when the builder was made.
#[derive(Debug)]
pub struct SnapshotBuilder<S = ClusterState> {
    state: S,
    last_applied: Option<LogId<NodeId>>,
    membership: Membership,
    snapshots: Arc<SnapshotFiles>,
}

impl<S: GroupState> RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder<S> {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, Error> {
        let data = self.state.to_snapshot();
        let meta = Meta {
            last_log_id: self.last_applied,
            last_membership: self.membership.clone(),
            snapshot_id: self.snapshots.next_id(self.last_applied),
        };
        self.snapshots.save(&meta, &data, true).await?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl<S: GroupState> RaftStateMachine<TypeConfig> for StateMachineStore<S> {
    type SnapshotBuilder = SnapshotBuilder<S>;

    async fn applied_state(&mut self) -> Result<(Option<LogId<NodeId>>, Membership), Error> {
        Ok((self.last_applied, self.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Response>, Error>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut responses = Vec::new();
        let revision = {
            let mut state = self.state.write().unwrap_or_else(|p| p.into_inner());
            for entry in entries {
                self.last_applied = Some(entry.log_id);
                responses.push(match entry.payload {
                    EntryPayload::Blank => Response::None,
                    EntryPayload::Membership(membership) => {
                        self.membership = StoredMembership::new(Some(entry.log_id), membership);
                        Response::None
                    }
                    EntryPayload::Normal(command) => {
                        self.applied_bytes
                            .fetch_add(command_size(&command), Ordering::Relaxed);
                        state.apply(&command)
                    }
                });
            }
            state.revision()
        };
        self.publish(revision);
        Ok(responses)
    }

    async fn get_snapshot_builder(&mut self) -> SnapshotBuilder<S> {
        SnapshotBuilder {
            state: self.state.read().unwrap_or_else(|p| p.into_inner()).clone(),
            last_applied: self.last_applied,
            membership: self.membership.clone(),
            snapshots: self.snapshots.clone(),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, Error> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &Meta,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), Error> {
        let data = snapshot.into_inner();
        let state = S::from_snapshot(&data).map_err(|e| {
            Error::from(StorageIOError::read_snapshot(
                Some(meta.signature()),
                AnyError::new(&e),
            ))
        })?;
        // Durable first: openraft purges the log up to it once this returns.
        self.snapshots.save(meta, &data, false).await?;
        let revision = state.revision();
        *self.state.write().unwrap_or_else(|p| p.into_inner()) = state;
        self.last_applied = meta.last_log_id;
        self.membership = meta.last_membership.clone();
        self.publish(revision);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, Error> {
        Ok(self.snapshots.load().await?.map(|(meta, data)| Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_checksum_is_crc32c() {
        // The standard check value of CRC-32C.
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(b""), 0);
    }

    #[tokio::test]
    async fn a_snapshot_whose_state_does_not_decode_is_an_open_error() {
        let dir = courier_test_support::TempDir::new("raft-snapshot-state");
        let meta = Meta {
            last_log_id: None,
            last_membership: Membership::default(),
            snapshot_id: "none-0-0".to_string(),
        };
        // Whole and checksummed, but its state is garbage.
        let body = encode_snapshot(&meta, &[0xff; 16]).unwrap();
        write_framed(dir.path(), SNAPSHOT_FILE, SNAPSHOT_MAGIC, &body).unwrap();
        assert!(matches!(
            open(dir.path()).await,
            Err(StorageOpenError::Snapshot(_))
        ));
    }

    #[test]
    fn ranges_of_any_shape_never_panic() {
        let index = RwLock::new(Index::new());
        assert!(read_range(&index, (Bound::Included(5), Bound::Excluded(3))).is_empty());
        assert!(read_range(&index, (Bound::Excluded(3), Bound::Excluded(3))).is_empty());
        assert!(read_range(&index, (Bound::Excluded(u64::MAX), Bound::Unbounded)).is_empty());
        assert!(read_range(&index, ..=u64::MAX).is_empty());
    }
}
