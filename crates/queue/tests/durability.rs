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
    let consumer = queue.consumer(MESSAGES);
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
    assert_eq!(queue.stats().acknowledged, MESSAGES as u64);
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
    let consumer = queue.consumer(1);
    let delivery = consumer.recv().await;
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
