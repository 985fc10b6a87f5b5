//! What an answered ack promises: its removal is durable. Watched through a
//! storage that records which removals it has made durable, not by timing.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use courier_queue::core::QueueConfig;
use courier_queue::log::Seq;
use courier_queue::storage::{Storage, StorageFuture};
use courier_queue::{Message, Queue};

mod common;

const REMOVE: u8 = 2;

/// Storage whose appends take a few scheduler turns, and which remembers
/// every removal once its append has completed.
#[derive(Default)]
struct Recording {
    next: AtomicU64,
    durable_removals: Mutex<HashSet<u64>>,
    /// While set, appends wait until it is cleared.
    gate: std::sync::atomic::AtomicBool,
}

struct Shared(Arc<Recording>);

impl Storage for Shared {
    fn append_batch(&self, records: Vec<(u8, Bytes)>) -> StorageFuture<'_, Seq> {
        Box::pin(async move {
            // Slow enough for concurrent acks to pile up behind this one.
            for _ in 0..20 {
                tokio::task::yield_now().await;
            }
            while self.0.gate.load(Ordering::SeqCst) {
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
            let first = self
                .0
                .next
                .fetch_add(records.len() as u64, Ordering::SeqCst);
            let mut durable = self.0.durable_removals.lock().unwrap();
            for (kind, payload) in &records {
                if *kind == REMOVE {
                    durable.insert(u64::from_le_bytes(payload[..8].try_into().unwrap()));
                }
            }
            Ok(first)
        })
    }

    fn remove_before(&self, _seq: Seq) -> StorageFuture<'_, usize> {
        Box::pin(async { Ok(0) })
    }

    fn bytes_on_disk(&self) -> u64 {
        0
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answered_ack_has_its_removal_durable_even_when_another_wrote_it() {
    let recording = Arc::new(Recording::default());
    let queue = Queue::with_storage(
        "acks",
        Box::new(Shared(recording.clone())),
        QueueConfig::default(),
    )
    .unwrap();
    const MESSAGES: usize = 4000;
    queue
        .enqueue_batch((0..MESSAGES).map(|_| Message::new("m")).collect())
        .await
        .unwrap();
    let consumer = queue.consumer(MESSAGES as u32).await.unwrap();
    let mut deliveries: Vec<_> = std::iter::from_fn(|| consumer.try_recv()).collect();
    assert_eq!(deliveries.len(), MESSAGES);
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let mine: Vec<_> = deliveries.split_off(deliveries.len() - MESSAGES / 8);
        let recording = recording.clone();
        tasks.push(tokio::spawn(async move {
            let mut early = 0;
            for delivery in mine {
                let id = delivery.id;
                delivery.ack().await.unwrap();
                if !recording.durable_removals.lock().unwrap().contains(&id) {
                    early += 1;
                }
            }
            early
        }));
    }
    let mut early = 0;
    for task in tasks {
        early += task.await.unwrap();
    }
    assert_eq!(early, 0, "acks answered before their removal was durable");
    assert_eq!(queue.stats_now().acknowledged, MESSAGES as u64);
}

#[tokio::test]
async fn an_ack_dropped_while_its_removal_is_written_still_gets_it_written() {
    let recording = Arc::new(Recording::default());
    let queue = Queue::with_storage(
        "cancelled",
        Box::new(Shared(recording.clone())),
        QueueConfig::default(),
    )
    .unwrap();
    queue.enqueue(Message::new("m")).await.unwrap();
    let mut consumer = queue.consumer(1).await.unwrap();
    let delivery = consumer.recv().await.unwrap();
    let id = delivery.id;
    // The write of its removal hangs, and the ack's future is dropped
    // meanwhile, as a remote ack's handler is when its caller cancels.
    recording.gate.store(true, Ordering::SeqCst);
    let dropped = tokio::time::timeout(std::time::Duration::from_millis(20), delivery.ack()).await;
    assert!(dropped.is_err(), "the ack waited for its removal");
    recording.gate.store(false, Ordering::SeqCst);
    // Nobody settles again, yet the removal is written: before, the
    // records a dropped settle had taken were lost with it.
    for _ in 0..1000 {
        if recording.durable_removals.lock().unwrap().contains(&id) {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
    panic!("the removal of an acknowledged message was never written");
}

/// A real log whose appends of a marked message write at once but return
/// only when let go: an enqueue that is on disk and not yet answered.
struct HeldBack {
    log: courier_queue::log::Log,
    /// Set once the marked record is written.
    written: Arc<tokio::sync::Notify>,
    /// A permit lets the marked append return.
    release: Arc<tokio::sync::Semaphore>,
}

const MARK: &[u8] = b"held back";

impl Storage for HeldBack {
    fn append_batch(&self, records: Vec<(u8, Bytes)>) -> StorageFuture<'_, Seq> {
        Box::pin(async move {
            let marked = records.iter().any(|(_, p)| p.ends_with(MARK));
            let first = self.log.append_batch(records).await?;
            if marked {
                self.written.notify_one();
                let _ = self.release.acquire().await.unwrap();
            }
            Ok(first)
        })
    }

    fn remove_before(&self, seq: Seq) -> StorageFuture<'_, usize> {
        Box::pin(self.log.remove_before(seq))
    }

    fn bytes_on_disk(&self) -> u64 {
        self.log.bytes_on_disk()
    }
}

/// Compaction deletes the segments before the oldest message it knows. An
/// enqueue whose record is written but which is not answered yet is not in
/// the core: before, a compaction then deleted its segment, and a message
/// answered as stored was gone after a restart.
#[tokio::test]
async fn a_message_answered_as_stored_survives_a_compaction_run_while_it_was_written() {
    use courier_queue::log::{FsyncPolicy, Log, LogOptions};
    use courier_queue::{Enqueued, QueueOptions};
    let dir = common::TempDir::new("compaction-race");
    let log_options = LogOptions::default()
        .with_fsync(FsyncPolicy::Always)
        .with_segment_size(16 * 1024);
    let (log, _) = Log::open(dir.path().join("q"), log_options.clone(), |_| {}).unwrap();
    let written = Arc::new(tokio::sync::Notify::new());
    let release = Arc::new(tokio::sync::Semaphore::new(0));
    let queue = Queue::with_storage(
        "q",
        Box::new(HeldBack {
            log,
            written: written.clone(),
            release: release.clone(),
        }),
        QueueConfig::default(),
    )
    .unwrap();
    // 255 messages over several segments, all delivered.
    queue
        .enqueue_batch((0..255).map(|_| Message::new(vec![7u8; 256])).collect())
        .await
        .unwrap();
    let consumer = queue.consumer(1000).await.unwrap();
    let mut deliveries: Vec<_> = std::iter::from_fn(|| consumer.try_recv()).collect();
    assert_eq!(deliveries.len(), 255);
    // The held-back enqueue: written, not answered.
    let held = {
        let queue = queue.clone();
        tokio::spawn(async move {
            let mut payload = vec![1u8; 100];
            payload.extend_from_slice(MARK);
            queue.enqueue(Message::new(payload)).await
        })
    };
    written.notified().await;
    // One more, larger than a segment, so the held-back record's segment
    // is no longer the one written to.
    queue
        .enqueue(Message::new(vec![9u8; 20 * 1024]))
        .await
        .unwrap();
    deliveries.extend(consumer.try_recv());
    assert_eq!(deliveries.len(), 256, "the large message is delivered too");
    // The 256th removal compacts; the core holds nothing at that moment.
    for delivery in deliveries {
        delivery.ack().await.unwrap();
    }
    release.add_permits(1);
    let Enqueued::Stored(id) = held.await.unwrap().unwrap() else {
        panic!("stored, not a duplicate");
    };
    drop(consumer);
    drop(queue);
    // Reopened as after a crash: every record is fsynced (`Always`).
    let options = QueueOptions::new(log_options, QueueConfig::default());
    let reopened = Queue::open(dir.path(), "q", options).await.unwrap();
    let consumer = reopened.consumer(10).await.unwrap();
    let delivery = consumer
        .try_recv()
        .expect("the message answered as stored is still there");
    assert_eq!(delivery.id, id);
    assert!(delivery.payload.ends_with(MARK));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answered_purge_has_every_removal_durable() {
    let recording = Arc::new(Recording::default());
    let queue = Queue::with_storage(
        "purged",
        Box::new(Shared(recording.clone())),
        QueueConfig::default(),
    )
    .unwrap();
    let stored = queue
        .enqueue_batch((0..100).map(|_| Message::new("m")).collect())
        .await
        .unwrap();
    let mut consumer = queue.consumer(1).await.unwrap();
    let leased = consumer.recv().await.unwrap();
    assert_eq!(queue.purge().await.unwrap(), 99);
    let durable = recording.durable_removals.lock().unwrap().clone();
    for outcome in stored {
        let courier_queue::Enqueued::Stored(id) = outcome else {
            panic!("no keys, no duplicates")
        };
        assert_eq!(
            durable.contains(&id),
            id != leased.id,
            "message {id}: only the leased one is not removed"
        );
    }
}
