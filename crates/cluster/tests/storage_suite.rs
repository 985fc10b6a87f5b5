//! The Raft storage against openraft's own test suite, and what that suite
//! does not check: restarts, truncation on disk, damaged files, power loss,
//! the shared state readers see.

use std::io::Cursor;
use std::path::Path;

use bytes::Bytes;
use courier_cluster::storage::{self, FileError, LogStore, StateMachineStore, StorageOpenError};
use courier_cluster::types::{Command, Condition, KvCommand, NodeId, TypeConfig};
use courier_queue::log::{Log, LogOptions};
use courier_test_support::TempDir;
use openraft::storage::{RaftLogStorage, RaftLogStorageExt, RaftStateMachine};
use openraft::testing::{blank_ent, log_id, membership_ent, StoreBuilder, Suite};
use openraft::{
    AnyError, Entry, EntryPayload, LogId, RaftLogReader, RaftSnapshotBuilder, StorageError,
    StorageIOError, Vote,
};

/// Each build in a fresh directory, removed (by the `TempDir` guard) after
/// the store is dropped.
struct Builder;

impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, TempDir> for Builder {
    async fn build(&self) -> Result<(TempDir, LogStore, StateMachineStore), StorageError<NodeId>> {
        let dir = TempDir::new("raft-suite");
        let (log, sm) = storage::open(dir.path())
            .await
            .map_err(|e| StorageIOError::write(AnyError::new(&e)))?;
        Ok((dir, log, sm))
    }
}

#[test]
fn openraft_storage_suite_passes() {
    Suite::test_all(Builder).expect("the openraft storage suite");
}

fn put(term: u64, index: u64, key: &str) -> Entry<TypeConfig> {
    Entry {
        log_id: log_id(term, 1, index),
        payload: EntryPayload::Normal(Command::Kv(KvCommand::Put {
            key: key.to_string(),
            value: Bytes::from(format!("value of {key}")),
            condition: Condition::Any,
            lease: None,
        })),
    }
}

/// Entries `range`, in term `term`: a membership entry at index 0, puts
/// at odd indexes, blanks at the others.
fn entries(term: u64, range: std::ops::Range<u64>) -> Vec<Entry<TypeConfig>> {
    range
        .map(|i| match i {
            0 => membership_ent::<TypeConfig>(term, 1, 0, vec![[1u64].into()]),
            i if i % 2 == 1 => put(term, i, &format!("k{i}")),
            i => blank_ent::<TypeConfig>(term, 1, i),
        })
        .collect()
}

async fn reopen(dir: &Path) -> (LogStore, StateMachineStore) {
    storage::open(dir).await.expect("the storage opens")
}

async fn all_entries(log: &mut LogStore) -> Vec<Entry<TypeConfig>> {
    log.try_get_log_entries(..).await.unwrap()
}

#[tokio::test]
async fn entries_vote_purge_point_and_snapshot_survive_a_restart() {
    let dir = TempDir::new("raft-restart");
    let written = entries(1, 0..10);
    let snapshot = {
        let (mut log, mut sm) = reopen(dir.path()).await;
        log.save_vote(&Vote::new(3, 1)).await.unwrap();
        log.blocking_append(written[..4].to_vec()).await.unwrap();
        log.blocking_append(written[4..].to_vec()).await.unwrap();
        sm.apply(written[..6].to_vec()).await.unwrap();
        let snapshot = sm
            .get_snapshot_builder()
            .await
            .build_snapshot()
            .await
            .unwrap();
        log.purge(log_id(1, 1, 3)).await.unwrap();
        snapshot
    };
    let revision = {
        // The same entries applied to a fresh state: what the snapshot holds.
        let mut state = courier_cluster::state::ClusterState::default();
        for entry in &written[..6] {
            if let EntryPayload::Normal(command) = &entry.payload {
                state.apply(command);
            }
        }
        state.revision()
    };

    let (mut log, mut sm) = reopen(dir.path()).await;
    assert_eq!(log.read_vote().await.unwrap(), Some(Vote::new(3, 1)));
    let state = log.get_log_state().await.unwrap();
    assert_eq!(state.last_purged_log_id, Some(log_id(1, 1, 3)));
    assert_eq!(state.last_log_id, Some(log_id(1, 1, 9)));
    assert_eq!(all_entries(&mut log).await, written[4..].to_vec());

    let (applied, membership) = sm.applied_state().await.unwrap();
    assert_eq!(applied, Some(log_id(1, 1, 5)));
    assert_eq!(membership, snapshot.meta.last_membership);
    let current = sm
        .get_current_snapshot()
        .await
        .unwrap()
        .expect("a snapshot");
    assert_eq!(current.meta, snapshot.meta);
    assert_eq!(
        current.snapshot.into_inner(),
        snapshot.snapshot.into_inner()
    );
    let shared = sm.shared();
    assert_eq!(shared.last_applied_index(), Some(5));
    assert_eq!(shared.read().revision(), revision);
    assert_eq!(*shared.revision_watch().borrow(), revision);

    // A snapshot built after the restart has a new id.
    let again = sm
        .get_snapshot_builder()
        .await
        .build_snapshot()
        .await
        .unwrap();
    assert_eq!(again.meta.last_log_id, snapshot.meta.last_log_id);
    assert_ne!(again.meta.snapshot_id, snapshot.meta.snapshot_id);
}

#[tokio::test]
async fn a_purge_past_the_last_entry_is_kept_and_indexes_go_on_from_it() {
    let dir = TempDir::new("raft-purge-past");
    {
        let (mut log, _sm) = reopen(dir.path()).await;
        log.blocking_append(entries(1, 0..5)).await.unwrap();
        // As after installing a snapshot that covers more than the log.
        log.purge(log_id(2, 1, 20)).await.unwrap();
        assert!(all_entries(&mut log).await.is_empty());
        // Entries the purge point covers are dropped, as openraft's suite
        // expects; the rest are kept.
        log.blocking_append(entries(2, 19..24)).await.unwrap();
        assert_eq!(all_entries(&mut log).await, entries(2, 21..24));
    }
    let (mut log, _sm) = reopen(dir.path()).await;
    let state = log.get_log_state().await.unwrap();
    assert_eq!(state.last_purged_log_id, Some(log_id(2, 1, 20)));
    assert_eq!(state.last_log_id, Some(log_id(2, 1, 23)));
    assert_eq!(all_entries(&mut log).await, entries(2, 21..24));
}

#[tokio::test]
async fn a_truncation_is_on_disk_after_a_restart() {
    let dir = TempDir::new("raft-truncate");
    {
        let (mut log, _sm) = reopen(dir.path()).await;
        log.blocking_append(entries(1, 0..10)).await.unwrap();
        log.truncate(log_id(1, 1, 5)).await.unwrap();
        assert_eq!(all_entries(&mut log).await, entries(1, 0..5));
        log.blocking_append(entries(2, 5..8)).await.unwrap();
    }
    let (mut log, _sm) = reopen(dir.path()).await;
    let mut expected = entries(1, 0..5);
    expected.extend(entries(2, 5..8));
    assert_eq!(all_entries(&mut log).await, expected);

    // Everything, down to index 0; then the log starts again.
    log.truncate(log_id(1, 1, 0)).await.unwrap();
    assert_eq!(log.get_log_state().await.unwrap().last_log_id, None);
    log.blocking_append(entries(3, 0..2)).await.unwrap();
    drop(log);
    let (mut log, _sm) = reopen(dir.path()).await;
    assert_eq!(all_entries(&mut log).await, entries(3, 0..2));
}

#[tokio::test]
async fn a_truncation_after_a_purge_keeps_the_purged_part_purged() {
    let dir = TempDir::new("raft-purge-truncate");
    {
        let (mut log, _sm) = reopen(dir.path()).await;
        log.blocking_append(entries(1, 0..10)).await.unwrap();
        log.purge(log_id(1, 1, 4)).await.unwrap();
        // Every entry left goes.
        log.truncate(log_id(1, 1, 5)).await.unwrap();
        assert_eq!(
            log.get_log_state().await.unwrap().last_log_id,
            Some(log_id(1, 1, 4))
        );
        log.blocking_append(entries(2, 5..7)).await.unwrap();
    }
    let (mut log, _sm) = reopen(dir.path()).await;
    assert_eq!(all_entries(&mut log).await, entries(2, 5..7));
    let state = log.get_log_state().await.unwrap();
    assert_eq!(state.last_purged_log_id, Some(log_id(1, 1, 4)));
}

#[tokio::test]
async fn an_append_that_does_not_follow_the_log_is_refused() {
    let dir = TempDir::new("raft-append-order");
    let (mut log, _sm) = reopen(dir.path()).await;
    log.blocking_append(entries(1, 0..5)).await.unwrap();
    assert!(log.blocking_append(entries(2, 3..4)).await.is_err());
    assert!(log.blocking_append(entries(2, 4..5)).await.is_err());
    // Nothing of the refused appends was kept.
    assert_eq!(all_entries(&mut log).await, entries(1, 0..5));
    drop(log);
    let (mut log, _sm) = reopen(dir.path()).await;
    assert_eq!(all_entries(&mut log).await, entries(1, 0..5));
}

/// Flips one byte of `path` at `at` bytes from its start.
fn flip(path: &Path, at: usize) {
    let mut bytes = std::fs::read(path).unwrap();
    bytes[at] ^= 0x40;
    std::fs::write(path, bytes).unwrap();
}

#[tokio::test]
async fn a_damaged_vote_file_is_an_error_never_a_guess() {
    let dir = TempDir::new("raft-vote-corrupt");
    {
        let (mut log, _sm) = reopen(dir.path()).await;
        log.save_vote(&Vote::new(7, 2)).await.unwrap();
    }
    let vote = dir.path().join("vote");
    let good = std::fs::read(&vote).unwrap();
    let damaged: Vec<Vec<u8>> = vec![
        Vec::new(),
        good[..good.len() - 1].to_vec(),
        {
            let mut b = good.clone();
            let last = b.len() - 1;
            b[last] ^= 1;
            b
        },
        b"CVOT\0\0\0\0".to_vec(),
        vec![0xff; 64 * 1024],
    ];
    for bytes in damaged {
        std::fs::write(&vote, &bytes).unwrap();
        match storage::open(dir.path()).await {
            Err(StorageOpenError::File(FileError::Corrupt { .. } | FileError::TooLarge { .. })) => {
            }
            other => panic!("{} bytes: {:?}", bytes.len(), other.map(|_| ())),
        }
    }

    // Damaged while open: read_vote reads the file again and says so.
    std::fs::write(&vote, &good).unwrap();
    let (mut log, _sm) = reopen(dir.path()).await;
    assert_eq!(log.read_vote().await.unwrap(), Some(Vote::new(7, 2)));
    flip(&vote, good.len() - 1);
    assert!(log.read_vote().await.is_err());
}

#[tokio::test]
async fn a_damaged_snapshot_file_is_an_error() {
    let dir = TempDir::new("raft-snapshot-corrupt");
    {
        let (_log, mut sm) = reopen(dir.path()).await;
        sm.apply(entries(1, 0..4)).await.unwrap();
        sm.get_snapshot_builder()
            .await
            .build_snapshot()
            .await
            .unwrap();
    }
    let path = dir.path().join("snapshot");
    let len = std::fs::metadata(&path).unwrap().len() as usize;
    flip(&path, len - 1);
    assert!(matches!(
        storage::open(dir.path()).await,
        Err(StorageOpenError::File(FileError::Corrupt { .. }))
    ));
}

#[tokio::test]
async fn records_that_are_not_entries_are_an_error_on_open() {
    let cases: [(u8, &[u8]); 3] = [
        (1, b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff not postcard"),
        (9, b"an unknown kind"),
        (0, b"a second header"),
    ];
    for (kind, payload) in cases {
        let dir = TempDir::new("raft-bad-record");
        {
            let (mut log, _sm) = reopen(dir.path()).await;
            log.blocking_append(entries(1, 0..3)).await.unwrap();
        }
        {
            let (log, _) =
                Log::open(dir.path().join("log"), LogOptions::default(), |_| {}).unwrap();
            log.append(kind, Bytes::from_static(payload)).await.unwrap();
        }
        match storage::open(dir.path()).await {
            Err(StorageOpenError::BadRecord { seq: 4, .. }) => {}
            other => panic!("kind {kind}: {:?}", other.map(|_| ())),
        }
    }
}

#[tokio::test]
async fn entries_out_of_index_order_on_disk_are_an_error_on_open() {
    let dir = TempDir::new("raft-bad-order");
    {
        let (mut log, _sm) = reopen(dir.path()).await;
        log.blocking_append(entries(1, 0..3)).await.unwrap();
    }
    {
        let (log, _) = Log::open(dir.path().join("log"), LogOptions::default(), |_| {}).unwrap();
        let again = postcard::to_allocvec(&entries(1, 1..2)[0]).unwrap();
        log.append(1, Bytes::from(again)).await.unwrap();
    }
    assert!(matches!(
        storage::open(dir.path()).await,
        Err(StorageOpenError::BadRecord { seq: 4, .. })
    ));
}

/// A power loss: whatever no fsync covered is gone. Under the Raft log's
/// `FsyncPolicy::Always` every flushed append is in the durable image, so
/// the entries appended after the image (and the image alone) are the
/// only ones lost.
#[tokio::test]
async fn a_power_loss_keeps_every_flushed_entry_and_nothing_after_it() {
    let dir = TempDir::new("raft-power-loss");
    let image = {
        let (mut log, _sm) = reopen(dir.path()).await;
        log.save_vote(&Vote::new(2, 1)).await.unwrap();
        for i in 0..10 {
            log.blocking_append(entries(1, i..i + 1)).await.unwrap();
        }
        let image = log.durable_image();
        log.blocking_append(entries(1, 10..20)).await.unwrap();
        log.save_vote(&Vote::new(3, 1)).await.unwrap();
        image
    };
    image.apply().unwrap();
    let (mut log, _sm) = reopen(dir.path()).await;
    assert_eq!(all_entries(&mut log).await, entries(1, 0..10));
    // The vote file is durable on its own (renamed after an fsync).
    assert_eq!(log.read_vote().await.unwrap(), Some(Vote::new(3, 1)));
    // And the log goes on from there.
    log.blocking_append(entries(2, 10..12)).await.unwrap();
    drop(log);
    let (mut log, _sm) = reopen(dir.path()).await;
    let mut expected = entries(1, 0..10);
    expected.extend(entries(2, 10..12));
    assert_eq!(all_entries(&mut log).await, expected);
}

#[tokio::test]
async fn readers_share_the_state_its_revision_and_the_applied_index() {
    let dir = TempDir::new("raft-shared");
    let (_log, mut sm) = reopen(dir.path()).await;
    let shared = sm.shared();
    let mut watch = shared.revision_watch();
    assert_eq!(shared.last_applied_index(), None);
    assert!(!watch.has_changed().unwrap());
    let before = shared.read().revision();
    let responses = sm.apply(entries(1, 0..4)).await.unwrap();
    assert_eq!(responses.len(), 4);
    assert_eq!(shared.last_applied_index(), Some(3));
    let after = shared.read().revision();
    assert_eq!(watch.has_changed().unwrap(), after != before);
    assert_eq!(*watch.borrow_and_update(), after);
    let (applied, membership) = sm.applied_state().await.unwrap();
    assert_eq!(applied, Some(log_id(1, 1, 3)));
    assert_eq!(membership.log_id(), &Some(log_id(1, 1, 0)));
    drop(sm);
    // The state machine gone, watchers hear of it.
    assert!(watch.changed().await.is_err());
}

#[tokio::test]
async fn an_installed_snapshot_replaces_the_state_and_survives_a_restart() {
    let leader_dir = TempDir::new("raft-install-leader");
    let follower_dir = TempDir::new("raft-install-follower");
    let (_leader_log, mut leader) = reopen(leader_dir.path()).await;
    leader.apply(entries(1, 0..8)).await.unwrap();
    let built = leader
        .get_snapshot_builder()
        .await
        .build_snapshot()
        .await
        .unwrap();
    let leader_revision = leader.shared().read().revision();
    {
        let (_log, mut follower) = reopen(follower_dir.path()).await;
        let shared = follower.shared();
        let mut received = follower.begin_receiving_snapshot().await.unwrap();
        *received = Cursor::new(built.snapshot.get_ref().clone());
        follower
            .install_snapshot(&built.meta, received)
            .await
            .unwrap();
        assert_eq!(shared.last_applied_index(), Some(7));
        assert_eq!(shared.read().revision(), leader_revision);
        assert_eq!(
            follower.applied_state().await.unwrap(),
            (built.meta.last_log_id, built.meta.last_membership.clone())
        );
    }
    let (_log, mut follower) = reopen(follower_dir.path()).await;
    let current = follower
        .get_current_snapshot()
        .await
        .unwrap()
        .expect("a snapshot");
    assert_eq!(current.meta, built.meta);
    assert_eq!(follower.shared().read().revision(), leader_revision);

    // A snapshot whose state does not decode is refused, and nothing changes.
    let mut garbage = follower.begin_receiving_snapshot().await.unwrap();
    *garbage = Cursor::new(vec![0xff; 16]);
    let mut meta = built.meta.clone();
    meta.last_log_id = Some(log_id(1, 1, 100));
    assert!(follower.install_snapshot(&meta, garbage).await.is_err());
    assert_eq!(
        follower.applied_state().await.unwrap().0,
        built.meta.last_log_id
    );
}

#[tokio::test]
async fn log_readers_see_appends_truncations_and_purges() {
    let dir = TempDir::new("raft-reader");
    let (mut log, _sm) = reopen(dir.path()).await;
    let mut reader = log.get_log_reader().await;
    log.blocking_append(entries(1, 0..6)).await.unwrap();
    assert_eq!(
        reader.try_get_log_entries(2..4).await.unwrap(),
        entries(1, 2..4)
    );
    log.truncate(log_id(1, 1, 4)).await.unwrap();
    log.purge(log_id(1, 1, 1)).await.unwrap();
    assert_eq!(
        reader.try_get_log_entries(..).await.unwrap(),
        entries(1, 2..4)
    );
    let _: Option<LogId<NodeId>> = log.get_log_state().await.unwrap().last_log_id;
}

/// openraft builds snapshots in a task of their own: a build from an older
/// state that finishes after an install must not replace the installed
/// snapshot.
#[tokio::test]
async fn a_stale_build_never_replaces_a_newer_snapshot() {
    let leader_dir = TempDir::new("raft-stale-leader");
    let dir = TempDir::new("raft-stale");
    let (_leader_log, mut leader) = reopen(leader_dir.path()).await;
    leader.apply(entries(1, 0..8)).await.unwrap();
    let newer = leader
        .get_snapshot_builder()
        .await
        .build_snapshot()
        .await
        .unwrap();

    let (_log, mut sm) = reopen(dir.path()).await;
    sm.apply(entries(1, 0..3)).await.unwrap();
    let mut stale = sm.get_snapshot_builder().await;
    let mut received = sm.begin_receiving_snapshot().await.unwrap();
    *received = Cursor::new(newer.snapshot.get_ref().clone());
    sm.install_snapshot(&newer.meta, received).await.unwrap();
    let built = stale.build_snapshot().await.unwrap();
    assert_eq!(built.meta.last_log_id, Some(log_id(1, 1, 2)));
    let current = sm
        .get_current_snapshot()
        .await
        .unwrap()
        .expect("a snapshot");
    assert_eq!(current.meta, newer.meta);
}

#[tokio::test]
async fn a_leadership_read_back_is_only_a_vote_so_a_restarted_leader_must_win_a_new_term() {
    let dir = TempDir::new("raft-vote-committed");
    {
        let (mut log, _sm) = reopen(dir.path()).await;
        log.save_vote(&Vote::new_committed(4, 2)).await.unwrap();
    }
    let (mut log, _sm) = reopen(dir.path()).await;
    let vote = log.read_vote().await.unwrap().expect("a vote");
    assert_eq!(
        vote,
        Vote::new(4, 2),
        "same term and candidate, not committed"
    );
    // Still a vote in term 4: nobody else can be granted that term.
    assert!(Vote::new(4, 3).partial_cmp(&vote).is_none());
}
