//! The node's shared log (`courier_cluster::wal`): openraft's storage suite
//! on it, and what the suite does not check: many groups in one log across
//! restarts, a power loss, shared fsyncs, compaction of idle groups, and a
//! removed group's entries never reaching a new one.

use std::path::Path;

use bytes::Bytes;
use courier_cluster::storage::{self, LogStore, StateMachineStore, StorageOpenError};
use courier_cluster::types::{Command, Condition, GroupId, KvCommand, NodeId, TypeConfig};
use courier_cluster::wal::{NodeWal, WalOptions};
use courier_test_support::TempDir;
use openraft::storage::{RaftLogStorage, RaftLogStorageExt};
use openraft::testing::{log_id, StoreBuilder, Suite};
use openraft::{AnyError, Entry, EntryPayload, RaftLogReader, StorageError, StorageIOError, Vote};

struct Builder;

impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, TempDir> for Builder {
    async fn build(&self) -> Result<(TempDir, LogStore, StateMachineStore), StorageError<NodeId>> {
        let dir = TempDir::new("wal-suite");
        let wal = NodeWal::open(&dir.path().join("wal"), WalOptions::default())
            .await
            .map_err(|e| StorageIOError::write(AnyError::new(&e)))?;
        let (log, sm) = storage::open_queue_group(&dir.path().join("group"), Some(&wal), 5)
            .await
            .map_err(|e| StorageIOError::write(AnyError::new(&e)))?;
        Ok((dir, log, sm))
    }
}

#[test]
fn openraft_storage_suite_passes_on_the_shared_log() {
    Suite::test_all(Builder).expect("the openraft storage suite");
}

/// Entries `range` in term `term`, each a put of a value of `size` bytes.
fn entries(term: u64, range: std::ops::Range<u64>, size: usize) -> Vec<Entry<TypeConfig>> {
    range
        .map(|i| Entry {
            log_id: log_id(term, 1, i),
            payload: EntryPayload::Normal(Command::Kv(KvCommand::Put {
                key: format!("k{i}"),
                value: Bytes::from(vec![i as u8; size]),
                condition: Condition::Any,
                lease: None,
            })),
        })
        .collect()
}

async fn open_wal(dir: &Path, options: WalOptions) -> NodeWal {
    NodeWal::open(&dir.join("wal"), options)
        .await
        .expect("the node log opens")
}

async fn open_group(dir: &Path, wal: &NodeWal, group: GroupId) -> LogStore {
    let (log, _sm): (LogStore, StateMachineStore) =
        storage::open_queue_group(&dir.join(format!("g{group}")), Some(wal), group)
            .await
            .expect("the group opens");
    log
}

async fn all(log: &mut LogStore) -> Vec<Entry<TypeConfig>> {
    log.try_get_log_entries(..).await.unwrap()
}

#[tokio::test]
async fn groups_in_one_log_keep_their_own_entries_truncations_and_purges_across_a_restart() {
    let dir = TempDir::new("wal-groups");
    {
        let wal = open_wal(dir.path(), WalOptions::default()).await;
        let mut a = open_group(dir.path(), &wal, 1).await;
        let mut b = open_group(dir.path(), &wal, 2).await;
        let mut c = open_group(dir.path(), &wal, 3).await;
        for i in 0..10 {
            a.blocking_append(entries(1, i..i + 1, 8)).await.unwrap();
            b.blocking_append(entries(1, i..i + 1, 8)).await.unwrap();
            c.blocking_append(entries(1, i..i + 1, 8)).await.unwrap();
        }
        // b's new leader replaces its entries from 6 on.
        b.truncate(log_id(1, 1, 6)).await.unwrap();
        b.blocking_append(entries(2, 6..8, 8)).await.unwrap();
        // c is covered by a snapshot up to 4.
        c.purge(log_id(1, 1, 4)).await.unwrap();
        c.save_vote(&Vote::new(4, 2)).await.unwrap();
    }
    let wal = open_wal(dir.path(), WalOptions::default()).await;
    assert_eq!(wal.groups(), vec![1, 2, 3]);
    let mut a = open_group(dir.path(), &wal, 1).await;
    let mut b = open_group(dir.path(), &wal, 2).await;
    let mut c = open_group(dir.path(), &wal, 3).await;
    assert_eq!(all(&mut a).await, entries(1, 0..10, 8));
    let mut expected_b = entries(1, 0..6, 8);
    expected_b.extend(entries(2, 6..8, 8));
    assert_eq!(all(&mut b).await, expected_b);
    assert_eq!(all(&mut c).await, entries(1, 5..10, 8));
    let state = c.get_log_state().await.unwrap();
    assert_eq!(state.last_purged_log_id, Some(log_id(1, 1, 4)));
    assert_eq!(c.read_vote().await.unwrap(), Some(Vote::new(4, 2)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_of_many_groups_at_once_share_fsyncs() {
    let dir = TempDir::new("wal-fsyncs");
    let wal = open_wal(dir.path(), WalOptions::default()).await;
    let mut groups = Vec::new();
    for g in 1..=20 {
        groups.push(open_group(dir.path(), &wal, g).await);
    }
    let before = wal.fsyncs();
    let rounds = 10u64;
    let count = groups.len() as u64;
    let mut tasks = tokio::task::JoinSet::new();
    for mut log in groups {
        tasks.spawn(async move {
            for i in 0..rounds {
                log.blocking_append(entries(1, i..i + 1, 256))
                    .await
                    .unwrap();
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
    let fsyncs = wal.fsyncs() - before;
    let appends = rounds * count;
    println!("{appends} appends from 20 groups took {fsyncs} fsyncs");
    // A log per group would take one fsync per append.
    assert!(fsyncs < appends, "{fsyncs} fsyncs for {appends} appends");
}

#[tokio::test]
async fn a_power_loss_keeps_every_flushed_entry_of_every_group() {
    let dir = TempDir::new("wal-power");
    let image = {
        let wal = open_wal(dir.path(), WalOptions::default()).await;
        let mut a = open_group(dir.path(), &wal, 1).await;
        let mut b = open_group(dir.path(), &wal, 2).await;
        for i in 0..5 {
            a.blocking_append(entries(1, i..i + 1, 64)).await.unwrap();
            b.blocking_append(entries(1, i..i + 1, 64)).await.unwrap();
        }
        let image = wal.durable_probe().image();
        a.blocking_append(entries(1, 5..9, 64)).await.unwrap();
        image
    };
    image.apply().unwrap();
    let wal = open_wal(dir.path(), WalOptions::default()).await;
    let mut a = open_group(dir.path(), &wal, 1).await;
    let mut b = open_group(dir.path(), &wal, 2).await;
    assert_eq!(all(&mut a).await, entries(1, 0..5, 64));
    assert_eq!(all(&mut b).await, entries(1, 0..5, 64));
}

/// An idle group pins the oldest segment; compaction copies it forward so
/// the log stays within its bound while a busy group purges, and nothing
/// of either is lost across a restart.
#[tokio::test]
async fn an_idle_group_is_copied_forward_and_the_log_stays_bounded() {
    let dir = TempDir::new("wal-compact");
    let options = WalOptions::default()
        .with_segment_size(16 * 1024)
        .with_max_segments(4);
    {
        let wal = open_wal(dir.path(), options.clone()).await;
        let mut idle = open_group(dir.path(), &wal, 1).await;
        let mut busy = open_group(dir.path(), &wal, 2).await;
        idle.blocking_append(entries(1, 0..3, 100)).await.unwrap();
        let mut most = 0;
        for i in 0..400u64 {
            busy.blocking_append(entries(1, i..i + 1, 1000))
                .await
                .unwrap();
            if i % 20 == 19 {
                // A snapshot covers all but the last 10.
                busy.purge(log_id(1, 1, i - 10)).await.unwrap();
            }
            wal.compact().await;
            most = most.max(wal.segments());
        }
        assert!(wal.rewrites() > 0, "the idle group was never copied");
        // Over 400 KB written in 16 KiB segments: without compaction the
        // idle group's first segment would keep every one.
        assert!(
            wal.segments() <= 6,
            "{} segments after compaction (at most {most} on the way)",
            wal.segments()
        );
        println!(
            "{} segments, at most {most}, {} entries copied",
            wal.segments(),
            wal.rewrites()
        );
    }
    let wal = open_wal(dir.path(), options).await;
    let mut idle = open_group(dir.path(), &wal, 1).await;
    let mut busy = open_group(dir.path(), &wal, 2).await;
    assert_eq!(all(&mut idle).await, entries(1, 0..3, 100));
    let kept = all(&mut busy).await;
    assert_eq!(kept.last().map(|e| e.log_id.index), Some(399));
    assert_eq!(kept, entries(1, 390..400, 1000));
}

#[tokio::test]
async fn a_removed_groups_entries_never_reach_a_new_group_of_the_same_id() {
    let dir = TempDir::new("wal-forget");
    let wal = open_wal(dir.path(), WalOptions::default()).await;
    {
        let mut old = open_group(dir.path(), &wal, 7).await;
        old.blocking_append(entries(1, 0..4, 8)).await.unwrap();
    }
    // Removed with forget: gone from the log.
    wal.forget(7).await.unwrap();
    assert!(wal.groups().is_empty());
    std::fs::remove_dir_all(dir.path().join("g7")).unwrap();
    {
        let mut new = open_group(dir.path(), &wal, 7).await;
        assert!(all(&mut new).await.is_empty());
        new.blocking_append(entries(1, 0..2, 8)).await.unwrap();
    }
    // Removed without forget (its directory deleted by hand): a group
    // opened in a fresh directory still finds nothing.
    std::fs::remove_dir_all(dir.path().join("g7")).unwrap();
    drop(wal);
    let wal = open_wal(dir.path(), WalOptions::default()).await;
    assert_eq!(wal.groups(), vec![7]);
    let mut new = open_group(dir.path(), &wal, 7).await;
    assert!(all(&mut new).await.is_empty());
}

#[tokio::test]
async fn a_group_keeps_the_kind_of_log_it_was_created_with() {
    let dir = TempDir::new("wal-kinds");
    let wal = open_wal(dir.path(), WalOptions::default()).await;
    // Created with a log of its own (before the node had a shared log).
    {
        let (mut own, _sm): (LogStore, StateMachineStore) =
            storage::open_queue_group(&dir.path().join("g1"), None, 1)
                .await
                .unwrap();
        own.blocking_append(entries(1, 0..3, 8)).await.unwrap();
    }
    let mut own = open_group(dir.path(), &wal, 1).await;
    assert_eq!(all(&mut own).await, entries(1, 0..3, 8));
    assert!(wal.groups().is_empty(), "its entries stayed in its own log");
    // Created in the shared log: without it, it refuses to open.
    {
        let mut shared = open_group(dir.path(), &wal, 2).await;
        shared.blocking_append(entries(1, 0..3, 8)).await.unwrap();
    }
    let refused: Result<(LogStore, StateMachineStore), _> =
        storage::open_queue_group(&dir.path().join("g2"), None, 2).await;
    assert!(matches!(refused, Err(StorageOpenError::File(_))));
}

#[tokio::test]
async fn a_damaged_record_is_an_error_on_open() {
    let dir = TempDir::new("wal-damaged");
    {
        let wal = open_wal(dir.path(), WalOptions::default()).await;
        let mut a = open_group(dir.path(), &wal, 1).await;
        a.blocking_append(entries(1, 0..3, 8)).await.unwrap();
        a.blocking_append(entries(1, 3..6, 8)).await.unwrap();
    }
    // Write a record of an unknown kind after them, through the log itself.
    {
        let (log, _) = courier_queue::log::Log::open(
            dir.path().join("wal"),
            courier_queue::log::LogOptions::default(),
            |_| {},
        )
        .unwrap();
        log.append(42, Bytes::from_static(b"not ours"))
            .await
            .unwrap();
    }
    let opened = NodeWal::open(&dir.path().join("wal"), WalOptions::default()).await;
    assert!(matches!(opened, Err(StorageOpenError::BadRecord { .. })));
}
