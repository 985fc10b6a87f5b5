//! One write-ahead log per node, shared by all its queue groups
//! ([`NodeWal`]), so a node with many replicated queues pays one fsync per
//! batch of appends, not one per queue (RabbitMQ's Ra does the same).
//!
//! Each group's [`LogStore`](crate::storage::LogStore) keeps its vote,
//! purge point and snapshots in its own directory, as before; only its log
//! entries go here. Appends from every group reach one
//! [`courier_queue::log::Log`] under `FsyncPolicy::Always`, whose writer
//! takes everything queued while the previous fsync ran and writes it with
//! the next: the group commit is the log's own.
//!
//! # Records
//!
//! One record per entry or operation, each naming its group:
//!
//! ```text
//! kind 1  APPEND    postcard(group, entry)  drop the group's entries at and
//!                                           after entry's index, then put it
//! kind 2  REWRITE   postcard(group, entry)  put entry at its index (a copy)
//! kind 3  TRUNCATE  postcard(group, index)  drop entries at and after index
//! kind 4  FORGET    postcard(group)         drop every entry of the group
//! ```
//!
//! Replaying the records in order rebuilds every group's log; a group
//! then drops what its own purge point covers when it opens.
//!
//! # Keeping the log bounded
//!
//! An entry's record sequence number never decreases with its index (an
//! append follows the last entry, or a truncation; a rewrite copies a whole
//! group), so a group needs only the records from its first entry's on.
//! Segments before the smallest of those over all groups are deleted after
//! each purge. A group that is idle pins its old records, so when the log
//! has more than [`WalOptions::max_segments`] segments, the group pinning
//! the oldest is copied to the head (`REWRITE`, under the group's write
//! lock, so no append of it interleaves) and the old segments go. A copy
//! torn by a crash is harmless: it repeats entries the older records,
//! still on disk until the copy is durable, already give.
//!
//! A group removed from this node must be [`NodeWal::forget`]ten before its
//! directory goes, or a queue declared again under the same group id would
//! find the old entries: a group directory records that it lives here (the
//! file `in-node-wal`), and one opened without it first forgets whatever
//! the log holds for its id.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use bytes::Bytes;
use courier_queue::log::{AppendError, DurableProbe, FsyncPolicy, Log, LogOptions, Record, Seq};
use openraft::Entry;

use crate::storage::StorageOpenError;
use crate::types::{GroupId, TypeConfig};

const APPEND: u8 = 1;
const REWRITE: u8 = 2;
const TRUNCATE: u8 = 3;
const FORGET: u8 = 4;

/// Raft index -> (record sequence number, entry), as in the storage.
pub(crate) type Index = BTreeMap<u64, (Seq, Entry<TypeConfig>)>;

/// Settings of a node's shared log.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct WalOptions {
    /// A segment is closed once it exceeds this. Default 16 MiB.
    pub segment_size: u64,
    /// Beyond this many segments, idle groups are copied forward so old
    /// segments can go. Default 8 (so about 128 MiB at most, plus the live
    /// entries of groups whose log is longer than that).
    pub max_segments: u64,
}

impl Default for WalOptions {
    fn default() -> Self {
        WalOptions {
            segment_size: 16 * 1024 * 1024,
            max_segments: 8,
        }
    }
}

impl WalOptions {
    /// The same options with another segment size (tests use small ones).
    pub fn with_segment_size(mut self, bytes: u64) -> WalOptions {
        self.segment_size = bytes;
        self
    }

    /// The same options with another segment bound.
    pub fn with_max_segments(mut self, segments: u64) -> WalOptions {
        self.max_segments = segments.max(2);
        self
    }
}

/// One group's entries in the shared log, held by the log (for
/// compaction) and by the group's store.
#[derive(Debug)]
pub(crate) struct GroupLog {
    pub(crate) id: GroupId,
    pub(crate) index: Arc<RwLock<Index>>,
    /// Held by whatever writes the group's records (its store's appends,
    /// truncations and purges, and a rewrite), so their order on disk is
    /// the order of their effect on `index`.
    pub(crate) write: tokio::sync::Mutex<()>,
}

impl GroupLog {
    fn new(id: GroupId, index: Index) -> GroupLog {
        GroupLog {
            id,
            index: Arc::new(RwLock::new(index)),
            write: tokio::sync::Mutex::new(()),
        }
    }

    fn first_seq(&self) -> Option<Seq> {
        let index = self.index.read().unwrap_or_else(|p| p.into_inner());
        index.first_key_value().map(|(_, (seq, _))| *seq)
    }
}

/// A node's write-ahead log, shared by its queue groups (see the
/// [module docs](self)). Cheap to clone.
#[derive(Clone, Debug)]
pub struct NodeWal {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    log: Log,
    dir: PathBuf,
    groups: Mutex<HashMap<GroupId, Arc<GroupLog>>>,
    options: WalOptions,
    /// One compaction at a time.
    compacting: tokio::sync::Mutex<()>,
    /// A compaction task is spawned and has not finished.
    scheduled: std::sync::atomic::AtomicBool,
    /// No compaction starts before the log is this large again, so a group
    /// whose live entries alone fill the bound is not copied on every
    /// append.
    compact_above: AtomicU64,
    /// Records appended after the highest sequence number known.
    next_seq: AtomicU64,
    rewrites: AtomicU64,
}

/// A problem writing the shared log, for the storage to report.
#[derive(Debug, thiserror::Error)]
pub(crate) enum WalWriteError {
    #[error("cannot encode an entry: {0}")]
    Encode(#[from] postcard::Error),
    #[error(transparent)]
    Append(#[from] AppendError),
}

fn encode<T: serde::Serialize>(kind: u8, value: &T) -> Result<(u8, Bytes), postcard::Error> {
    Ok((kind, Bytes::from(postcard::to_allocvec(value)?)))
}

impl NodeWal {
    /// Opens (creating if needed) the shared log in `dir` and replays it.
    /// A record that is not one of this log's is an error, as is
    /// corruption before the end (entries acknowledged may be gone).
    pub async fn open(dir: &Path, options: WalOptions) -> Result<NodeWal, StorageOpenError> {
        let dir = dir.to_path_buf();
        let opened = {
            let dir = dir.clone();
            let options = options.clone();
            tokio::task::spawn_blocking(move || replay(&dir, &options))
                .await
                .map_err(|e| StorageOpenError::Interrupted(e.to_string()))??
        };
        let (log, groups, next_seq) = opened;
        let compact_above = log.bytes_on_disk();
        Ok(NodeWal {
            inner: Arc::new(Inner {
                log,
                dir,
                groups: Mutex::new(
                    groups
                        .into_iter()
                        .map(|(id, index)| (id, Arc::new(GroupLog::new(id, index))))
                        .collect(),
                ),
                options,
                compacting: tokio::sync::Mutex::new(()),
                scheduled: std::sync::atomic::AtomicBool::new(false),
                compact_above: AtomicU64::new(compact_above),
                next_seq: AtomicU64::new(next_seq),
                rewrites: AtomicU64::new(0),
            }),
        })
    }

    /// The directory it lives in.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// fsyncs performed since it opened: one per batch, whatever the
    /// number of groups in the batch.
    pub fn fsyncs(&self) -> u64 {
        self.inner.log.fsyncs()
    }

    /// Segment files on disk.
    pub fn segments(&self) -> u64 {
        self.inner.log.segments()
    }

    /// Bytes on disk.
    pub fn bytes_on_disk(&self) -> u64 {
        self.inner.log.bytes_on_disk()
    }

    /// Entries copied forward by compaction so far.
    pub fn rewrites(&self) -> u64 {
        self.inner.rewrites.load(Ordering::Relaxed)
    }

    /// The groups that have entries here.
    pub fn groups(&self) -> Vec<GroupId> {
        let groups = self.inner.groups.lock().unwrap_or_else(|p| p.into_inner());
        let mut ids: Vec<GroupId> = groups
            .iter()
            .filter(|(_, g)| g.first_seq().is_some())
            .map(|(id, _)| *id)
            .collect();
        ids.sort_unstable();
        ids
    }

    /// FOR TESTS: the power-loss probe of the underlying log.
    #[doc(hidden)]
    pub fn durable_probe(&self) -> DurableProbe {
        self.inner.log.durable_probe()
    }

    /// Drops every entry of `group`, durably; call it before removing the
    /// group's directory.
    pub async fn forget(&self, group: GroupId) -> Result<(), AppendError> {
        let log = self.group(group);
        {
            let _writing = log.write.lock().await;
            let record = encode(FORGET, &group).map_err(|e| AppendError::Io(e.to_string()))?;
            self.append(vec![record]).await?;
            log.index.write().unwrap_or_else(|p| p.into_inner()).clear();
        }
        self.inner
            .groups
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&group);
        self.release().await;
        Ok(())
    }

    /// The group's entries (registering it if it has none yet).
    pub(crate) fn group(&self, group: GroupId) -> Arc<GroupLog> {
        let mut groups = self.inner.groups.lock().unwrap_or_else(|p| p.into_inner());
        groups
            .entry(group)
            .or_insert_with(|| Arc::new(GroupLog::new(group, Index::new())))
            .clone()
    }

    async fn append(&self, records: Vec<(u8, Bytes)>) -> Result<Seq, AppendError> {
        let count = records.len() as u64;
        let first = self.inner.log.append_batch(records).await?;
        self.inner
            .next_seq
            .fetch_max(first + count, Ordering::Relaxed);
        Ok(first)
    }

    /// Appends `entries` of `group` (the caller holds its write lock and
    /// updates its index): returns the first record's sequence number once
    /// durable.
    pub(crate) async fn append_entries(
        &self,
        group: GroupId,
        entries: &[Entry<TypeConfig>],
    ) -> Result<Seq, WalWriteError> {
        let records = entries
            .iter()
            .map(|entry| encode(APPEND, &(group, entry)))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(self.append(records).await?)
    }

    /// Records that `group` drops its entries from `index` on (the caller
    /// holds its write lock).
    pub(crate) async fn truncate(&self, group: GroupId, index: u64) -> Result<(), WalWriteError> {
        self.append(vec![encode(TRUNCATE, &(group, index))?])
            .await?;
        Ok(())
    }

    /// After a group's writes: starts a compaction if the log is over its
    /// bound (and has grown by a segment since the last one).
    pub(crate) fn after_write(&self) {
        let inner = &self.inner;
        if inner.log.segments() <= inner.options.max_segments
            || inner.log.bytes_on_disk() <= inner.compact_above.load(Ordering::Relaxed)
        {
            return;
        }
        if tokio::runtime::Handle::try_current().is_err()
            || inner.scheduled.swap(true, Ordering::AcqRel)
        {
            return;
        }
        let wal = self.clone();
        tokio::spawn(async move {
            wal.compact().await;
            wal.inner.scheduled.store(false, Ordering::Release);
        });
    }

    /// Deletes the segments no group needs any more.
    pub(crate) async fn release(&self) {
        let groups: Vec<Arc<GroupLog>> = {
            let groups = self.inner.groups.lock().unwrap_or_else(|p| p.into_inner());
            groups.values().cloned().collect()
        };
        let needed = groups
            .iter()
            .filter_map(|g| g.first_seq())
            .min()
            .unwrap_or_else(|| self.inner.next_seq.load(Ordering::Relaxed));
        if let Err(e) = self.inner.log.remove_before(needed).await {
            tracing::warn!(dir = %self.inner.dir.display(), "cannot remove old segments of the node log: {e}");
        }
    }

    /// Copies the groups that pin the oldest segments to the head, one at
    /// a time, until the log is within its bound or every group has been
    /// copied once.
    pub async fn compact(&self) {
        let Ok(_one) = self.inner.compacting.try_lock() else {
            return;
        };
        let groups: Vec<Arc<GroupLog>> = {
            let groups = self.inner.groups.lock().unwrap_or_else(|p| p.into_inner());
            groups.values().cloned().collect()
        };
        let mut order: Vec<(Seq, Arc<GroupLog>)> = groups
            .into_iter()
            .filter_map(|g| g.first_seq().map(|seq| (seq, g)))
            .collect();
        order.sort_by_key(|(seq, _)| *seq);
        for (_, group) in order {
            if self.inner.log.segments() <= self.inner.options.max_segments {
                break;
            }
            if let Err(e) = self.rewrite(&group).await {
                tracing::warn!(dir = %self.inner.dir.display(), "cannot compact the node log: {e}");
                break;
            }
            self.release().await;
        }
        self.inner.compact_above.store(
            self.inner.log.bytes_on_disk() + self.inner.options.segment_size,
            Ordering::Relaxed,
        );
    }

    async fn rewrite(&self, group: &GroupLog) -> Result<(), WalWriteError> {
        let _writing = group.write.lock().await;
        let id = group.id;
        let entries: Vec<Entry<TypeConfig>> = {
            let index = group.index.read().unwrap_or_else(|p| p.into_inner());
            index.values().map(|(_, e)| e.clone()).collect()
        };
        if entries.is_empty() {
            return Ok(());
        }
        let records = entries
            .iter()
            .map(|entry| encode(REWRITE, &(id, entry)))
            .collect::<Result<Vec<_>, _>>()?;
        let first = self.append(records).await?;
        let mut index = group.index.write().unwrap_or_else(|p| p.into_inner());
        for (seq, (_, (at, _))) in (first..).zip(index.iter_mut()) {
            *at = seq;
        }
        self.inner
            .rewrites
            .fetch_add(entries.len() as u64, Ordering::Relaxed);
        Ok(())
    }
}

type Replayed = (Log, HashMap<GroupId, Index>, Seq);

fn replay(dir: &Path, options: &WalOptions) -> Result<Replayed, StorageOpenError> {
    let mut groups: HashMap<GroupId, Index> = HashMap::new();
    let mut bad: Option<(Seq, String)> = None;
    let apply = |record: Record| {
        if bad.is_some() {
            return;
        }
        if let Err(reason) = apply_record(&mut groups, &record) {
            bad = Some((record.seq, reason));
        }
    };
    let log_options = LogOptions::default()
        .with_fsync(FsyncPolicy::Always)
        .with_segment_size(options.segment_size);
    let (log, recovery) = Log::open(dir, log_options, apply)?;
    if let Some((seq, reason)) = bad {
        return Err(StorageOpenError::BadRecord {
            path: dir.to_path_buf(),
            seq,
            reason,
        });
    }
    if let Some(c) = recovery.corruption.first() {
        return Err(StorageOpenError::CorruptLog {
            path: dir.to_path_buf(),
            details: format!(
                "{} at byte {}: {}",
                c.segment.display(),
                c.position,
                c.reason
            ),
        });
    }
    if recovery.truncated_bytes > 0 {
        tracing::warn!(
            bytes = recovery.truncated_bytes,
            "cut a torn, unacknowledged batch off the node log"
        );
    }
    groups.retain(|_, index| !index.is_empty());
    Ok((log, groups, recovery.next_seq))
}

fn apply_record(groups: &mut HashMap<GroupId, Index>, record: &Record) -> Result<(), String> {
    let undecodable = |e: postcard::Error| format!("undecodable record: {e}");
    match record.kind {
        APPEND | REWRITE => {
            let (group, entry): (GroupId, Entry<TypeConfig>) =
                postcard::from_bytes(&record.payload).map_err(undecodable)?;
            let index = groups.entry(group).or_default();
            let at = entry.log_id.index;
            if record.kind == APPEND {
                index.split_off(&at);
            }
            index.insert(at, (record.seq, entry));
        }
        TRUNCATE => {
            let (group, at): (GroupId, u64) =
                postcard::from_bytes(&record.payload).map_err(undecodable)?;
            if let Some(index) = groups.get_mut(&group) {
                index.split_off(&at);
            }
        }
        FORGET => {
            let group: GroupId = postcard::from_bytes(&record.payload).map_err(undecodable)?;
            groups.remove(&group);
        }
        other => return Err(format!("unknown record kind {other}")),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::testing::blank_ent;

    fn record(seq: Seq, kind: u8, payload: Vec<u8>) -> Record {
        Record {
            seq,
            kind,
            payload: Bytes::from(payload),
        }
    }

    fn entry_record(seq: Seq, kind: u8, group: GroupId, term: u64, index: u64) -> Record {
        let entry = blank_ent::<TypeConfig>(term, 1, index);
        record(seq, kind, postcard::to_allocvec(&(group, &entry)).unwrap())
    }

    fn terms(groups: &HashMap<GroupId, Index>, group: GroupId) -> Vec<(u64, u64)> {
        groups
            .get(&group)
            .map(|index| {
                index
                    .iter()
                    .map(|(at, (_, e))| (*at, e.log_id.leader_id.term))
                    .collect()
            })
            .unwrap_or_default()
    }

    #[test]
    fn an_append_replaces_what_follows_a_rewrite_does_not_and_groups_stay_apart() {
        let mut groups = HashMap::new();
        let records = [
            entry_record(0, APPEND, 7, 1, 1),
            entry_record(1, APPEND, 7, 1, 2),
            entry_record(2, APPEND, 9, 1, 1),
            entry_record(3, APPEND, 7, 1, 3),
            // A new leader's entry at 2 replaces 2 and 3.
            entry_record(4, APPEND, 7, 2, 2),
            // A copy of entry 1 keeps what follows it.
            entry_record(5, REWRITE, 7, 1, 1),
        ];
        for r in &records {
            apply_record(&mut groups, r).unwrap();
        }
        assert_eq!(terms(&groups, 7), vec![(1, 1), (2, 2)]);
        assert_eq!(terms(&groups, 9), vec![(1, 1)]);
        let truncate = record(6, TRUNCATE, postcard::to_allocvec(&(7u64, 2u64)).unwrap());
        apply_record(&mut groups, &truncate).unwrap();
        assert_eq!(terms(&groups, 7), vec![(1, 1)]);
        let forget = record(7, FORGET, postcard::to_allocvec(&9u64).unwrap());
        apply_record(&mut groups, &forget).unwrap();
        assert!(terms(&groups, 9).is_empty());
    }

    #[test]
    fn unknown_and_undecodable_records_are_errors() {
        let mut groups = HashMap::new();
        assert!(apply_record(&mut groups, &record(0, 9, vec![1])).is_err());
        assert!(apply_record(&mut groups, &record(0, APPEND, vec![0xff; 3])).is_err());
        assert!(apply_record(&mut groups, &record(0, TRUNCATE, vec![])).is_err());
    }

    #[test]
    fn a_record_of_random_bytes_never_panics() {
        let mut groups = HashMap::new();
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        for n in 0..2000u64 {
            let len = (n % 40) as usize;
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    state as u8
                })
                .collect();
            let kind = 1 + (n % 4) as u8;
            let _ = apply_record(&mut groups, &record(n, kind, bytes));
        }
    }
}
