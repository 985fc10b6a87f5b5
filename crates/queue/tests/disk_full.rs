//! A full disk: the enqueue fails with a clear error, everything stored
//! before stays readable, and the log holds no torn record.
//!
//! Needs a small tmpfs, which the test mounts itself (as root). Where it
//! cannot mount one, it says so and checks nothing.

use std::path::PathBuf;
use std::process::Command;

use courier_queue::core::QueueConfig;
use courier_queue::log::{AppendError, FsyncPolicy, Log, LogOptions};
use courier_queue::{Message, Queue, QueueError, QueueOptions};

struct TinyDisk(PathBuf);

impl TinyDisk {
    fn mount(bytes: usize) -> Option<TinyDisk> {
        // One mount point each: tests in this file run at once.
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "courier-full-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path).ok()?;
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
            .arg(&path)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if mounted {
            Some(TinyDisk(path))
        } else {
            let _ = std::fs::remove_dir(&path);
            None
        }
    }
}

impl Drop for TinyDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[tokio::test]
async fn a_full_disk_fails_the_enqueue_and_loses_nothing_stored() {
    let Some(disk) = TinyDisk::mount(256 * 1024) else {
        println!("skipped: cannot mount a tmpfs here (needs root)");
        return;
    };
    let options = QueueOptions::new(
        LogOptions::default()
            .with_fsync(FsyncPolicy::Always)
            .with_segment_size(64 * 1024),
        QueueConfig::default(),
    );
    let queue = Queue::open(&disk.0, "q", options.clone()).await.unwrap();
    let mut stored = 0u32;
    let error = loop {
        let payload = [stored.to_le_bytes().to_vec(), vec![0xAB; 1020]].concat();
        match queue.enqueue(Message::new(payload)).await {
            Ok(_) => stored += 1,
            Err(err) => break err,
        }
        assert!(stored < 10_000, "the disk never filled");
    };
    assert!(stored > 100, "stored {stored} before the disk filled");
    let QueueError::Append(AppendError::Io(reason)) = &error else {
        panic!("{error:?}")
    };
    assert!(reason.contains("No space"), "{reason}");
    assert!(error.is_retryable());

    // Everything stored is still there to read.
    let consumer = queue.consumer(stored).await.unwrap();
    for expected in 0..stored {
        let delivery = consumer.try_recv().expect("a stored message");
        assert_eq!(
            u32::from_le_bytes(delivery.payload[..4].try_into().unwrap()),
            expected
        );
    }
    drop(consumer);
    drop(queue);

    // And on disk: no torn record was left by the failed write.
    let mut replayed = 0u32;
    let (_log, recovery) =
        Log::open(disk.0.join("q"), LogOptions::default(), |_| replayed += 1).unwrap();
    assert_eq!(recovery.truncated_bytes, 0, "the failed batch was undone");
    assert!(recovery.corruption.is_empty());
    assert_eq!(replayed, stored);
}

/// A batch that rolls to a new segment and then fails there (disk full)
/// must leave that segment without a torn record or a gap in sequence
/// numbers: before, the cut-back only looked at the segment the batch began
/// in, so the torn bytes stayed and replay stopped at them, losing every
/// append that succeeded afterwards.
#[tokio::test]
async fn a_batch_failing_after_a_segment_roll_loses_no_later_append() {
    let Some(disk) = TinyDisk::mount(256 * 1024) else {
        println!("skipped: cannot mount a tmpfs here (needs root)");
        return;
    };
    // Room to free once the disk is full.
    let ballast = disk.0.join("ballast");
    std::fs::write(&ballast, vec![0u8; 32 * 1024]).unwrap();
    let options = LogOptions::default()
        .with_fsync(FsyncPolicy::Always)
        .with_segment_size(64 * 1024);
    let dir = disk.0.join("log");
    let (log, _) = Log::open(&dir, options.clone(), |_| {}).unwrap();
    // Nearly a segment: the next record rolls.
    log.append(1, vec![1u8; 62 * 1024].into()).await.unwrap();
    // One record that fills the segment and rolls, then more than the disk
    // holds, written to the new segment in one write that fails halfway.
    let mut batch = vec![(1u8, bytes::Bytes::from(vec![2u8; 4 * 1024]))];
    batch.extend((0..100).map(|_| (1u8, bytes::Bytes::from(vec![3u8; 2 * 1024]))));
    let failed = log.append_batch(batch).await;
    assert!(matches!(failed, Err(AppendError::Io(_))), "{failed:?}");
    assert!(log.segments() >= 2, "the batch rolled to a new segment");
    std::fs::remove_file(&ballast).unwrap();
    let after = log
        .append(9, bytes::Bytes::from_static(b"after"))
        .await
        .unwrap();
    drop(log);
    let mut replayed = Vec::new();
    let (_log, recovery) = Log::open(&dir, options, |record| replayed.push(record)).unwrap();
    assert!(recovery.corruption.is_empty(), "{:?}", recovery.corruption);
    let last = replayed.last().expect("records");
    assert_eq!((last.seq, &last.payload[..]), (after, &b"after"[..]));
}
