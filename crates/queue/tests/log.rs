//! The log at its own boundary: replay, group commit, torn and corrupt
//! records, segment removal and limits.

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use courier_queue::log::{AppendError, FsyncPolicy, Log, LogOptions, OpenError, Record};

mod common;

use common::TempDir;

fn reopen(dir: &Path, options: &LogOptions) -> (Log, courier_queue::log::Recovery, Vec<Record>) {
    let mut records = Vec::new();
    let (log, recovery) = Log::open(dir, options.clone(), |r| records.push(r)).unwrap();
    (log, recovery, records)
}

fn payload(n: u64) -> Bytes {
    Bytes::from(format!("message {n} {}", "x".repeat((n % 50) as usize)))
}

fn segment_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    files.sort();
    files
}

#[tokio::test]
async fn records_replay_in_order_across_segments() {
    let dir = TempDir::new("replay");
    let options = LogOptions::default()
        .with_segment_size(4096)
        .with_fsync(FsyncPolicy::Never);
    let (log, recovery, records) = reopen(&dir.0, &options);
    assert_eq!((recovery.records, records.len()), (0, 0));
    for n in 0..1000u64 {
        assert_eq!(log.append((n % 3) as u8, payload(n)).await.unwrap(), n);
    }
    let first = log
        .append_batch((1000..1100).map(|n| (7, payload(n))).collect())
        .await
        .unwrap();
    assert_eq!(first, 1000);
    assert!(log.segments() > 5, "rolled into several segments");
    log.close();

    let (log, recovery, records) = reopen(&dir.0, &options);
    assert_eq!(recovery.records, 1100);
    assert_eq!(recovery.truncated_bytes, 0);
    assert!(recovery.corruption.is_empty());
    for (n, record) in records.iter().enumerate() {
        let n = n as u64;
        assert_eq!(record.seq, n);
        assert_eq!(record.payload, payload(n));
        assert_eq!(record.kind, if n < 1000 { (n % 3) as u8 } else { 7 });
    }
    assert_eq!(
        log.append(0, payload(0)).await.unwrap(),
        1100,
        "numbering continues"
    );
}

#[tokio::test]
async fn a_batch_is_one_fsync_and_concurrent_appends_share_them() {
    let dir = TempDir::new("group");
    let (log, _, _) = reopen(&dir.0, &LogOptions::default());
    let before = log.fsyncs();
    log.append_batch((0..100).map(|n| (0, payload(n))).collect())
        .await
        .unwrap();
    assert_eq!(log.fsyncs() - before, 1, "one fsync for a batch of 100");

    let log = std::sync::Arc::new(log);
    let appends: Vec<_> = (0..200u64)
        .map(|n| {
            let log = log.clone();
            tokio::spawn(async move { log.append(1, payload(n)).await.unwrap() })
        })
        .collect();
    let mut seqs = Vec::new();
    for append in appends {
        seqs.push(append.await.unwrap());
    }
    seqs.sort();
    assert_eq!(
        seqs,
        (100..300).collect::<Vec<_>>(),
        "every append got its own place"
    );
    assert!(log.fsyncs() - before <= 201);
}

/// Writes `count` records and returns the byte offset where the last starts.
async fn write_records(dir: &Path, count: u64) -> (PathBuf, u64, u64) {
    let (log, _, _) = reopen(dir, &LogOptions::default());
    for n in 0..count {
        log.append(0, payload(n)).await.unwrap();
    }
    log.close();
    let file = segment_files(dir).pop().unwrap();
    let len = std::fs::metadata(&file).unwrap().len();
    let last_len = 8 + 9 + payload(count - 1).len() as u64;
    (file, len - last_len, len)
}

#[tokio::test]
async fn a_log_directory_in_use_cannot_be_opened_twice() {
    let dir = TempDir::new("locked");
    let (log, _, _) = reopen(&dir.0, &LogOptions::default());
    let second = Log::open(&dir.0, LogOptions::default(), |_| {});
    assert!(
        matches!(second, Err(OpenError::Locked { .. })),
        "{:?}",
        second.map(|_| ())
    );
    // Free again as soon as the first is closed.
    log.close();
    let (_log, _, _) = reopen(&dir.0, &LogOptions::default());
}

/// A lock someone holds for a moment more (a forked child keeps the lock
/// file's descriptor until its `exec`) is waited for, not reported: CI
/// once failed to reopen a log it had just closed, because another test
/// was spawning `umount` at that instant.
#[test]
fn a_lock_released_a_moment_later_is_taken() {
    let dir = TempDir::new("lock-later");
    drop(Log::open(&dir.0, LogOptions::default(), |_| {}).unwrap());
    let holder = std::fs::File::options()
        .write(true)
        .open(dir.0.join("LOCK"))
        .unwrap();
    holder.lock().unwrap();
    let release = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(50));
        drop(holder);
    });
    let opened = Log::open(&dir.0, LogOptions::default(), |_| {});
    release.join().unwrap();
    assert!(opened.is_ok(), "{:?}", opened.map(|_| ()));
}

#[tokio::test]
async fn a_torn_last_record_is_cut_off_at_every_possible_offset() {
    let source = TempDir::new("torn-source");
    let (_, last_start, full_len) = write_records(&source.0, 20).await;
    for cut in last_start + 1..full_len {
        let dir = TempDir::new("torn");
        std::fs::create_dir_all(&dir.0).unwrap();
        for file in segment_files(&source.0) {
            std::fs::copy(&file, dir.0.join(file.file_name().unwrap())).unwrap();
        }
        let file = segment_files(&dir.0).pop().unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&file)
            .unwrap()
            .set_len(cut)
            .unwrap();

        let (log, recovery, records) = reopen(&dir.0, &LogOptions::default());
        assert_eq!(records.len(), 19, "cut at {cut}");
        assert_eq!(recovery.truncated_bytes, cut - last_start, "cut at {cut}");
        assert!(recovery.corruption.is_empty());
        assert_eq!(std::fs::metadata(&file).unwrap().len(), last_start);
        assert_eq!(
            log.append(0, payload(19)).await.unwrap(),
            19,
            "the log goes on where it was cut"
        );
        log.close();
        let (_, recovery, records) = reopen(&dir.0, &LogOptions::default());
        assert_eq!((records.len(), recovery.truncated_bytes), (20, 0));
    }
}

#[tokio::test]
async fn a_flipped_byte_in_the_last_record_is_treated_as_a_torn_write() {
    let dir = TempDir::new("flip-last");
    let (file, last_start, full_len) = write_records(&dir.0, 10).await;
    let mut bytes = std::fs::read(&file).unwrap();
    bytes[(full_len - 3) as usize] ^= 0x20;
    std::fs::write(&file, bytes).unwrap();
    let (_, recovery, records) = reopen(&dir.0, &LogOptions::default());
    assert_eq!(records.len(), 9);
    assert_eq!(recovery.truncated_bytes, full_len - last_start);
}

#[tokio::test]
async fn corruption_in_the_middle_is_reported_with_its_location_and_never_replayed() {
    let dir = TempDir::new("flip-middle");
    let (file, _, _) = write_records(&dir.0, 10).await;
    // Flip a byte inside the 5th record's payload.
    let record_len = |n: u64| 8 + 9 + payload(n).len() as u64;
    let fifth: u64 = (0..4).map(record_len).sum();
    let mut bytes = std::fs::read(&file).unwrap();
    bytes[(fifth + 20) as usize] ^= 0x01;
    std::fs::write(&file, &bytes).unwrap();

    let (log, recovery, records) = reopen(&dir.0, &LogOptions::default());
    assert_eq!(records.len(), 4, "only the records before the damage");
    assert!(records
        .iter()
        .enumerate()
        .all(|(n, r)| r.payload == payload(n as u64)));
    assert_eq!(recovery.corruption.len(), 1);
    let corruption = &recovery.corruption[0];
    assert_eq!(corruption.segment, file);
    assert_eq!(corruption.position, fifth);
    assert_eq!(corruption.unreadable_bytes, bytes.len() as u64 - fifth);
    assert!(
        corruption.reason.contains("checksum"),
        "{}",
        corruption.reason
    );
    assert_eq!(
        recovery.truncated_bytes, 0,
        "evidence is kept, not truncated"
    );

    // New appends go to a fresh segment and survive the next open.
    let seq = log.append(0, Bytes::from_static(b"after")).await.unwrap();
    assert_eq!(seq, 4);
    log.close();
    let (_, recovery, records) = reopen(&dir.0, &LogOptions::default());
    assert_eq!(records.len(), 5);
    assert_eq!(&records[4].payload[..], b"after");
    assert_eq!(recovery.corruption.len(), 1, "still reported");
}

#[tokio::test]
async fn garbage_files_never_panic_or_replay() {
    let dir = TempDir::new("garbage");
    std::fs::create_dir_all(&dir.0).unwrap();
    std::fs::write(dir.0.join("00000000000000000000.log"), [0xFFu8; 100]).unwrap();
    std::fs::write(dir.0.join("not-a-segment.txt"), b"ignored").unwrap();
    let (log, recovery, records) = reopen(&dir.0, &LogOptions::default());
    assert!(records.is_empty());
    assert_eq!(recovery.corruption.len(), 1);
    assert!(recovery.corruption[0].reason.contains("length"));
    log.append(0, Bytes::from_static(b"fine")).await.unwrap();
}

#[tokio::test]
async fn consumed_segments_are_removed_oldest_first() {
    let dir = TempDir::new("remove");
    let options = LogOptions::default()
        .with_segment_size(2048)
        .with_fsync(FsyncPolicy::Never);
    let (log, _, _) = reopen(&dir.0, &options);
    for n in 0..500 {
        log.append(0, payload(n)).await.unwrap();
    }
    let (segments, bytes) = (log.segments(), log.bytes_on_disk());
    let removed = log.remove_before(250).await.unwrap();
    assert!(removed > 0);
    assert_eq!(log.segments(), segments - removed as u64);
    assert!(log.bytes_on_disk() < bytes);
    assert_eq!(
        log.remove_before(250).await.unwrap(),
        0,
        "nothing more below 250"
    );
    log.close();
    let (_, recovery, records) = reopen(&dir.0, &options);
    assert!(recovery.corruption.is_empty());
    let first = records[0].seq;
    assert!(
        first <= 250 && first > 0,
        "kept everything from 250 on, first is {first}"
    );
    assert_eq!(records.last().unwrap().seq, 499);
    assert!(records.windows(2).all(|w| w[1].seq == w[0].seq + 1));
}

#[tokio::test]
async fn oversized_records_are_refused_and_nothing_is_written() {
    let dir = TempDir::new("limit");
    let (log, _, _) = reopen(&dir.0, &LogOptions::default());
    let err = log
        .append(0, Bytes::from(vec![0u8; 5 * 1024 * 1024]))
        .await
        .unwrap_err();
    assert_eq!(
        err,
        AppendError::TooLarge {
            size: 5 * 1024 * 1024,
            limit: 4 * 1024 * 1024
        }
    );
    assert!(!err.is_retryable());
    assert_eq!(log.append(0, Bytes::new()).await.unwrap(), 0);
}

#[tokio::test]
async fn the_interval_policy_returns_before_syncing_and_syncs_soon_after() {
    // An hour-long interval: the append must have returned without an fsync.
    let lazy_dir = TempDir::new("interval-lazy");
    let hourly = LogOptions::default().with_fsync(FsyncPolicy::Interval(Duration::from_secs(3600)));
    let (lazy, _, _) = reopen(&lazy_dir.0, &hourly);
    lazy.append(0, payload(1)).await.unwrap();
    assert_eq!(lazy.fsyncs(), 0, "the append returned before any fsync");

    // A short interval: the background fsync comes (bounded wait).
    let dir = TempDir::new("interval");
    let options =
        LogOptions::default().with_fsync(FsyncPolicy::Interval(Duration::from_millis(20)));
    let (log, _, _) = reopen(&dir.0, &options);
    log.append(0, payload(1)).await.unwrap();
    for _ in 0..500 {
        if log.fsyncs() > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(log.fsyncs() >= 1);
}

#[tokio::test]
async fn the_interval_policy_syncs_under_continuous_load() {
    // Appends every 2 ms against a 20 ms interval: a timer restarted by
    // each append never fires; a deadline from the first unsynced write
    // does. Counted in fsyncs, not timed: the loop lasts at least 600 ms
    // (300 sleeps of 2 ms), so at least one interval has passed after a
    // write.
    let dir = TempDir::new("interval-load");
    let options =
        LogOptions::default().with_fsync(FsyncPolicy::Interval(Duration::from_millis(20)));
    let (log, _, _) = reopen(&dir.0, &options);
    for n in 0..300 {
        log.append(1, payload(n)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert!(log.fsyncs() >= 1, "no fsync in {} appends", 300);
}
