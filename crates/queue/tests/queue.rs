//! The embedded queue over real storage. Real time, with generous bounds:
//! the log's writer is a real thread, which tokio's paused clock would
//! race.

use std::collections::HashMap;
use std::time::Duration;

use courier_queue::core::{DeliveryOutcome, QueueConfig};
use courier_queue::log::{FsyncPolicy, LogOptions};
use courier_queue::{parse_dead_letter, Enqueued, Message, Queue, QueueError, QueueOptions};

mod common;

use common::TempDir;

fn options() -> QueueOptions {
    QueueOptions::new(
        LogOptions::default().with_fsync(FsyncPolicy::Never),
        QueueConfig::default(),
    )
}

async fn within<T>(what: &str, future: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(30), future)
        .await
        .unwrap_or_else(|_| panic!("{what}: nothing within 30 s"))
}

#[tokio::test]
async fn unacknowledged_messages_survive_a_restart_and_acknowledged_ones_do_not() {
    let dir = TempDir::new("restart");
    {
        let queue = Queue::open(&dir.0, "jobs", options()).await.unwrap();
        for n in 0..10u8 {
            assert!(matches!(
                queue.enqueue(Message::new(vec![n])).await.unwrap(),
                Enqueued::Stored(_)
            ));
        }
        let mut consumer = queue.consumer(10).await.unwrap();
        for _ in 0..4 {
            consumer.recv().await.unwrap().ack().await.unwrap();
        }
        let _held = (
            consumer.recv().await.unwrap(),
            consumer.recv().await.unwrap(),
        ); // delivered, never acknowledged
        assert_eq!(queue.stats_now().in_flight, 2);
    }
    let queue = Queue::open(&dir.0, "jobs", options()).await.unwrap();
    assert_eq!(queue.stats_now().depth, 6);
    let consumer = queue.consumer(10).await.unwrap();
    let mut payloads = Vec::new();
    while let Some(delivery) = consumer.try_recv() {
        payloads.push(delivery.payload[0]);
        delivery.ack().await.unwrap();
    }
    payloads.sort();
    assert_eq!(payloads, [4, 5, 6, 7, 8, 9]);
}

#[tokio::test]
async fn an_idempotency_key_seen_before_is_an_explicit_duplicate() {
    let dir = TempDir::new("dedup");
    let queue = Queue::open(&dir.0, "payments", options()).await.unwrap();
    let first = queue
        .enqueue(Message::new("pay 10").with_key("invoice-1"))
        .await
        .unwrap();
    let Enqueued::Stored(id) = first else {
        panic!("{first:?}")
    };
    assert_eq!(
        queue
            .enqueue(Message::new("pay 10").with_key("invoice-1"))
            .await
            .unwrap(),
        Enqueued::Duplicate(id)
    );
    let batch = queue
        .enqueue_batch(vec![
            Message::new("a").with_key("k2"),
            Message::new("b").with_key("k2"),
            Message::new("c"),
        ])
        .await
        .unwrap();
    let Enqueued::Stored(k2) = batch[0] else {
        panic!("{batch:?}")
    };
    assert_eq!(batch[1], Enqueued::Duplicate(k2), "within one batch too");
    assert!(matches!(batch[2], Enqueued::Stored(_)));
    assert_eq!(queue.stats_now().depth, 3);
    // The window survives a restart.
    drop(queue);
    let queue = Queue::open(&dir.0, "payments", options()).await.unwrap();
    assert_eq!(
        queue
            .enqueue(Message::new("pay 10").with_key("invoice-1"))
            .await
            .unwrap(),
        Enqueued::Duplicate(id)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn competing_consumers_share_the_work_and_each_message_is_processed_once() {
    let dir = TempDir::new("compete");
    let queue = Queue::open(&dir.0, "work", options()).await.unwrap();
    let messages: Vec<_> = (0..400u32)
        .map(|n| Message::new(n.to_le_bytes().to_vec()))
        .collect();
    queue.enqueue_batch(messages).await.unwrap();
    let workers: Vec<_> = (0..4)
        .map(|_| {
            let queue = queue.clone();
            tokio::spawn(async move {
                let consumer = queue.consumer(8).await.unwrap();
                let mut mine = Vec::new();
                while let Some(delivery) = consumer.try_recv() {
                    mine.push(u32::from_le_bytes(delivery.payload[..].try_into().unwrap()));
                    delivery.ack().await.unwrap();
                    tokio::task::yield_now().await;
                }
                mine
            })
        })
        .collect();
    let mut all = Vec::new();
    let mut shares = Vec::new();
    for worker in workers {
        let mine = within("worker", worker).await.unwrap();
        shares.push(mine.len());
        all.extend(mine);
    }
    all.sort();
    assert_eq!(all, (0..400).collect::<Vec<_>>(), "every message once");
    assert!(
        shares.iter().filter(|s| **s > 0).count() >= 2,
        "shared: {shares:?}"
    );
    assert_eq!(queue.stats_now().acknowledged, 400);
}

#[tokio::test]
async fn a_consumer_that_goes_away_gives_its_messages_to_another() {
    let dir = TempDir::new("gone");
    let queue = Queue::open(&dir.0, "work", options()).await.unwrap();
    queue
        .enqueue_batch((0..3u8).map(|n| Message::new(vec![n])).collect())
        .await
        .unwrap();
    let doomed = queue.consumer(3).await.unwrap();
    let held: Vec<_> = (0..3).map(|_| doomed.try_recv().unwrap()).collect();
    let mut survivor = queue.consumer(3).await.unwrap();
    assert!(survivor.try_recv().is_none());
    drop(held);
    drop(doomed);
    let again = within("redelivery", survivor.recv()).await.unwrap();
    assert_eq!(again.delivery, 2);
    // The dead consumer's late ack would be refused; the survivor's works.
    again.ack().await.unwrap();
}

#[tokio::test]
async fn a_failing_handler_gets_its_message_back_and_then_it_is_dead_lettered() {
    let dir = TempDir::new("dlq");
    let options = QueueOptions::new(
        LogOptions::default().with_fsync(FsyncPolicy::Never),
        QueueConfig::default().with_max_deliveries(2),
    );
    let queue = Queue::open(&dir.0, "fragile", options).await.unwrap();
    queue.enqueue(Message::new("poison")).await.unwrap();
    let mut consumer = queue.consumer(1).await.unwrap();
    for _ in 0..2 {
        let outcome = consumer
            .process(|_| async { Err::<(), _>("cannot parse") })
            .await
            .unwrap();
        assert_eq!(outcome, Err("cannot parse"));
    }
    assert!(consumer.try_recv().is_none(), "not delivered a third time");
    assert_eq!(queue.stats_now().dead_lettered, 1);
    let dlq = queue.dead_letters().unwrap();
    let dead = dlq
        .consumer(1)
        .await
        .unwrap()
        .try_recv()
        .expect("in the dead-letter queue");
    let (history, payload) = parse_dead_letter(dead.payload.clone()).unwrap();
    assert_eq!(&payload[..], b"poison");
    assert_eq!(history.len(), 2);
    assert!(history.iter().all(|h| h.outcome == DeliveryOutcome::Nacked));
}

#[tokio::test]
async fn delayed_messages_wait_and_expired_ones_are_dropped() {
    let dir = TempDir::new("time");
    let queue = Queue::open(&dir.0, "timed", options()).await.unwrap();
    queue
        .enqueue(Message::new("later").with_delay(Duration::from_secs(1)))
        .await
        .unwrap();
    queue
        .enqueue(Message::new("short-lived").with_ttl(Duration::from_millis(50)))
        .await
        .unwrap();
    let started = tokio::time::Instant::now();
    // The short-lived message expires unclaimed (bounded wait).
    within("expiry", async {
        while queue.stats_now().expired == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    let mut consumer = queue.consumer(1).await.unwrap();
    let later = within("delayed message", consumer.recv()).await.unwrap();
    assert_eq!(&later.payload[..], b"later");
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "delivered only after its delay"
    );
    later.ack().await.unwrap();
}

#[tokio::test]
async fn an_expired_lease_redelivers() {
    let dir = TempDir::new("lease");
    let options = QueueOptions::new(
        LogOptions::default().with_fsync(FsyncPolicy::Never),
        QueueConfig::default().with_visibility_timeout(Duration::from_millis(100)),
    );
    let queue = Queue::open(&dir.0, "leases", options).await.unwrap();
    queue.enqueue(Message::new("m")).await.unwrap();
    let mut slow = queue.consumer(1).await.unwrap();
    let first = slow.recv().await.unwrap();
    let mut other = queue.consumer(1).await.unwrap();
    let second = within("redelivery after the lease", other.recv())
        .await
        .unwrap();
    assert_eq!(second.delivery, 2);
    assert!(
        matches!(first.ack().await, Err(QueueError::Lease(_))),
        "the late ack is refused"
    );
    second.ack().await.unwrap();
    assert_eq!(queue.stats_now().redelivered, 1);
}

#[tokio::test]
async fn disk_use_follows_the_backlog() {
    let dir = TempDir::new("compact");
    let options = QueueOptions::new(
        LogOptions::default()
            .with_fsync(FsyncPolicy::Never)
            .with_segment_size(16 * 1024),
        QueueConfig::default(),
    );
    let queue = Queue::open(&dir.0, "big", options).await.unwrap();
    queue
        .enqueue_batch((0..2000u32).map(|_| Message::new(vec![7u8; 200])).collect())
        .await
        .unwrap();
    let full = queue.stats_now().bytes_on_disk;
    let consumer = queue.consumer(100).await.unwrap();
    let mut acked = HashMap::new();
    while let Some(delivery) = consumer.try_recv() {
        acked.insert(delivery.id, ());
        delivery.ack().await.unwrap();
    }
    assert_eq!(acked.len(), 2000);
    let after = queue.stats_now().bytes_on_disk;
    assert!(after < full / 4, "{after} bytes left of {full}");
}

#[tokio::test]
async fn bad_queue_names_are_refused() {
    let dir = TempDir::new("names");
    for bad in ["", "has space", "a/b", &"x".repeat(201)] {
        assert!(
            matches!(
                Queue::open(&dir.0, bad, options()).await,
                Err(QueueError::InvalidName(_))
            ),
            "{bad}"
        );
    }
}

#[tokio::test]
async fn an_ack_wakes_a_consumer_waiting_at_its_prefetch_limit() {
    let dir = TempDir::new("wake");
    let queue = Queue::open(&dir.0, "q", options()).await.unwrap();
    queue
        .enqueue_batch((0..2u8).map(|n| Message::new(vec![n])).collect())
        .await
        .unwrap();
    let mut consumer = queue.consumer(1).await.unwrap();
    let first = consumer.recv().await.unwrap();
    let waiting = tokio::spawn(async move { consumer.recv().await.unwrap().payload[0] });
    tokio::task::yield_now().await;
    assert!(!waiting.is_finished(), "held back by the prefetch of 1");
    first.ack().await.unwrap();
    assert_eq!(within("the waiting consumer", waiting).await.unwrap(), 1);
}

#[tokio::test]
async fn a_full_queue_refuses_more_and_takes_again_once_consumed() {
    let dir = TempDir::new("full");
    let options = QueueOptions::new(Default::default(), QueueConfig::default().with_max_depth(3));
    let queue = Queue::open(&dir.0, "bounded", options).await.unwrap();
    queue
        .enqueue_batch((0..3u8).map(|n| Message::new(vec![n])).collect())
        .await
        .unwrap();
    let err = queue
        .enqueue(Message::new("one too many"))
        .await
        .unwrap_err();
    assert!(matches!(err, QueueError::Full { limit: 3, .. }), "{err}");
    assert!(err.is_retryable());
    assert_eq!(
        queue.stats_now().depth,
        3,
        "nothing stored by the refused enqueue"
    );
    let mut consumer = queue.consumer(1).await.unwrap();
    consumer.recv().await.unwrap().ack().await.unwrap();
    queue.enqueue(Message::new("fits now")).await.unwrap();
}

/// Waits (bounded) until `done` holds, looking every 10 ms.
async fn until(what: &str, mut done: impl FnMut() -> bool) {
    within(what, async {
        while !done() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
}

#[tokio::test]
async fn a_lease_expires_by_itself_on_an_idle_queue_and_the_late_ack_is_refused() {
    let dir = TempDir::new("idle-lease");
    let options = QueueOptions::new(
        LogOptions::default().with_fsync(FsyncPolicy::Never),
        QueueConfig::default().with_visibility_timeout(Duration::from_millis(100)),
    );
    let queue = Queue::open(&dir.0, "idle", options).await.unwrap();
    queue.enqueue(Message::new("m")).await.unwrap();
    // Let the queue's timer see the enqueue and go idle (a ready message
    // needs no timer), so that nothing but the delivery can arm it.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let hung = queue.consumer(1).await.unwrap();
    let held = hung.try_recv().expect("ready");
    // Nothing else happens on the queue: the lease must end on its own.
    until("the lease to expire", || queue.stats_now().in_flight == 0).await;
    assert!(
        matches!(held.ack().await, Err(QueueError::Lease(_))),
        "an ack after the lease ended is refused"
    );
    let mut other = queue.consumer(1).await.unwrap();
    let again = within("redelivery", other.recv()).await.unwrap();
    assert_eq!(again.delivery, 2);
    again.ack().await.unwrap();
    assert_eq!(queue.stats_now().acknowledged, 1);
}

#[tokio::test]
async fn a_restarted_queue_copies_its_payloads_out_of_the_segment() {
    // Two live messages stored side by side in one segment. Replayed as
    // slices of the segment as read, they would sit in one allocation
    // exactly one record apart (and keep the whole segment alive); copied
    // out, each has an allocation of its own.
    let dir = TempDir::new("replay-copies");
    let payload = vec![9u8; 1000];
    {
        let queue = Queue::open(&dir.0, "pinned", options()).await.unwrap();
        queue
            .enqueue_batch(vec![Message::new(payload.clone()); 2])
            .await
            .unwrap();
    }
    let queue = Queue::open(&dir.0, "pinned", options()).await.unwrap();
    let consumer = queue.consumer(2).await.unwrap();
    let (a, b) = (consumer.try_recv().unwrap(), consumer.try_recv().unwrap());
    assert_eq!(
        (&a.payload[..], &b.payload[..]),
        (&payload[..], &payload[..])
    );
    let (first, second) = if a.id < b.id { (&a, &b) } else { (&b, &a) };
    // On disk: 8 header + 9 kind/seq + 26 enqueue header (no key) + payload.
    let record = 8 + 9 + 26 + payload.len();
    let distance = (second.payload.as_ptr() as usize).wrapping_sub(first.payload.as_ptr() as usize);
    assert_ne!(
        distance, record,
        "replayed payloads are slices of one segment buffer"
    );
}

#[tokio::test]
async fn a_dead_letter_queue_never_dead_letters_and_can_be_purged() {
    let dir = TempDir::new("dlq-is-a-queue");
    let options = QueueOptions::new(
        LogOptions::default().with_fsync(FsyncPolicy::Never),
        QueueConfig::default().with_max_deliveries(1),
    );
    let queue = Queue::open(&dir.0, "jobs", options.clone()).await.unwrap();
    queue.enqueue(Message::new("poison")).await.unwrap();
    queue
        .consumer(1)
        .await
        .unwrap()
        .try_recv()
        .unwrap()
        .nack(Duration::ZERO)
        .await
        .unwrap();
    let dlq = queue.dead_letters().unwrap().clone();
    assert_eq!(dlq.stats_now().depth, 1);
    // Nacked from the dead-letter queue many more times than
    // max_deliveries: it stays.
    let mut consumer = dlq.consumer(1).await.unwrap();
    for round in 1..=5 {
        let dead = within("the dead letter", consumer.recv()).await.unwrap();
        assert_eq!(dead.delivery, round);
        dead.nack(Duration::ZERO).await.unwrap();
    }
    assert_eq!(
        (dlq.stats_now().depth, dlq.stats_now().dead_lettered),
        (1, 0)
    );
    assert!(
        dlq.dead_letters().is_none(),
        "no dead-letter queue of its own"
    );
    assert_eq!(dlq.purge().await.unwrap(), 1);
    assert_eq!(dlq.stats_now().depth, 0);
    drop((consumer, dlq, queue));
    // Purged for good, and no `jobs.dlq.dlq` was made.
    let queue = Queue::open(&dir.0, "jobs", options).await.unwrap();
    assert_eq!(queue.dead_letters().unwrap().stats_now().depth, 0);
    assert!(!dir.0.join("jobs.dlq.dlq").exists());
}

#[tokio::test]
async fn names_that_are_directories_already_are_refused() {
    let dir = TempDir::new("dot-names");
    for bad in [".", ".."] {
        assert!(matches!(
            Queue::open(&dir.0, bad, options()).await,
            Err(QueueError::InvalidName(_))
        ));
    }
}

#[tokio::test]
async fn an_embedded_consumer_never_holds_more_than_its_prefetch_whatever_expires() {
    let dir = TempDir::new("embedded-prefetch");
    let options = QueueOptions::new(
        LogOptions::default().with_fsync(FsyncPolicy::Never),
        QueueConfig::default().with_visibility_timeout(Duration::from_millis(100)),
    );
    let queue = Queue::open(&dir.0, "work", options).await.unwrap();
    for n in 0..10u8 {
        queue.enqueue(Message::new(vec![n])).await.unwrap();
    }
    let mut greedy = queue.consumer(2).await.unwrap();
    let mut held = vec![greedy.recv().await.unwrap(), greedy.recv().await.unwrap()];
    // Both leases expire (another consumer gets the messages again); the
    // greedy one still holds its two deliveries, so it may take no more.
    let mut other = queue.consumer(2).await.unwrap();
    within("a redelivery after the leases", async {
        loop {
            let delivery = other.recv().await.unwrap();
            if delivery.delivery == 2 {
                break;
            }
            delivery.ack().await.unwrap();
        }
    })
    .await;
    assert!(
        greedy.try_recv().is_none(),
        "held more than its prefetch of 2"
    );
    // Answering one (too late to count) gives its place back.
    assert!(held.pop().unwrap().ack().await.is_err(), "late ack refused");
    held.push(within("one more", greedy.recv()).await.unwrap());
    assert!(
        greedy.try_recv().is_none(),
        "held more than its prefetch of 2"
    );
    // So does dropping one.
    queue.enqueue(Message::new("more")).await.unwrap();
    assert!(
        greedy.try_recv().is_none(),
        "held more than its prefetch of 2"
    );
    drop(held.pop());
    assert!(greedy.try_recv().is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_shared_by_several_tasks_still_holds_at_most_its_prefetch() {
    let dir = TempDir::new("shared-prefetch");
    let queue = Queue::open(&dir.0, "work", options()).await.unwrap();
    for n in 0..200u8 {
        queue.enqueue(Message::new(vec![n])).await.unwrap();
    }
    let consumer = std::sync::Arc::new(queue.consumer(3).await.unwrap());
    let mut takers = Vec::new();
    for _ in 0..8 {
        let consumer = consumer.clone();
        takers.push(std::thread::spawn(move || {
            let mut held = Vec::new();
            for _ in 0..50 {
                if let Some(delivery) = consumer.try_recv() {
                    held.push(delivery);
                }
            }
            held
        }));
    }
    let held: Vec<_> = takers.into_iter().flat_map(|t| t.join().unwrap()).collect();
    assert_eq!(
        held.len(),
        3,
        "eight threads took more than the prefetch of 3"
    );
}

#[tokio::test]
async fn peek_takes_nothing_and_purge_survives_a_restart_without_losing_leased_messages() {
    let dir = TempDir::new("peek-purge");
    {
        let queue = Queue::open(&dir.0, "jobs", options()).await.unwrap();
        for n in 0..5u8 {
            queue.enqueue(Message::new(vec![n])).await.unwrap();
        }
        queue
            .enqueue(Message::new(vec![9]).with_delay(Duration::from_secs(3600)))
            .await
            .unwrap();
        let mut consumer = queue.consumer(2).await.unwrap();
        let held = consumer.recv().await.unwrap();
        let answered = consumer.recv().await.unwrap();
        assert_eq!((held.payload[0], answered.payload[0]), (0, 1));
        let peeked = queue.peek_now(2);
        let shown: Vec<u8> = peeked.iter().map(|p| p.payload[0]).collect();
        assert_eq!(shown, [2, 3], "the next ready ones, oldest first");
        assert_eq!(peeked[0].deliveries, 0);
        assert_eq!(
            queue.peek_now(100).len(),
            3,
            "neither leased nor delayed ones"
        );
        assert_eq!(
            (queue.stats_now().depth, queue.stats_now().delivered),
            (4, 2)
        );

        // Purge: the 3 ready and the delayed one go; both leased ones stay
        // with their consumer, whose answers still count.
        assert_eq!(queue.purge().await.unwrap(), 4);
        assert_eq!(
            (queue.stats_now().depth, queue.stats_now().in_flight),
            (0, 2)
        );
        assert!(queue.peek_now(10).is_empty());
        answered.nack(Duration::ZERO).await.unwrap();
        let back: Vec<u8> = queue.peek_now(10).iter().map(|p| p.payload[0]).collect();
        assert_eq!(back, [1], "a leased message given back is ready again");
        assert_eq!(queue.peek_now(10)[0].deliveries, 1);
        // Its consumer goes: the one it still held is ready again too.
        drop((held, consumer));
        assert_eq!(queue.purge().await.unwrap(), 2);
        queue.enqueue(Message::new(vec![7])).await.unwrap();
        let mut consumer = queue.consumer(1).await.unwrap();
        let leased = consumer.recv().await.unwrap();
        assert_eq!(leased.payload[0], 7);
        assert_eq!(queue.purge().await.unwrap(), 0, "an empty purge is fine");
        // Still leased when the queue closes: never acknowledged, so kept.
    }
    let queue = Queue::open(&dir.0, "jobs", options()).await.unwrap();
    let left: Vec<u8> = queue.peek_now(10).iter().map(|p| p.payload[0]).collect();
    assert_eq!(left, [7], "purged messages stay purged across a restart");
}

#[tokio::test]
async fn declared_options_apply_survive_a_restart_and_cannot_change() {
    use courier_queue::{ErrorKind, QueueDeclaration};
    let dir = TempDir::new("declared");
    let strict = QueueDeclaration::new().with_max_deliveries(1);
    {
        let queue = Queue::open_declared(&dir.0, "strict", options(), strict.clone())
            .await
            .unwrap();
        assert_eq!(queue.declared(), &strict);
        queue.enqueue(Message::new("once")).await.unwrap();
        let mut consumer = queue.consumer(1).await.unwrap();
        consumer
            .recv()
            .await
            .unwrap()
            .nack(Duration::ZERO)
            .await
            .unwrap();
        // One delivery allowed (the host's default is 5): dead-lettered.
        assert_eq!(queue.stats_now().dead_lettered, 1);
        assert_eq!(queue.dead_letters().unwrap().stats_now().depth, 1);
        // The same options again are fine; others are a conflict.
        queue.declare(strict.clone()).await.unwrap();
        let err = queue
            .declare(QueueDeclaration::new().with_max_deliveries(2))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Conflict, "{err}");
    }
    // Reopened without a declaration: the stored one applies.
    {
        let queue = Queue::open(&dir.0, "strict", options()).await.unwrap();
        assert_eq!(queue.declared(), &strict);
        queue.enqueue(Message::new("twice")).await.unwrap();
        let mut consumer = queue.consumer(1).await.unwrap();
        consumer
            .recv()
            .await
            .unwrap()
            .nack(Duration::ZERO)
            .await
            .unwrap();
        assert_eq!(queue.stats_now().dead_lettered, 1);
    }
    // Declared again while closed: the same is fine, others are refused.
    let err = Queue::open_declared(&dir.0, "strict", options(), QueueDeclaration::new())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, QueueError::OptionsConflict { declared, .. } if *declared == strict),
        "{err}"
    );
    drop(
        Queue::open_declared(&dir.0, "strict", options(), strict.clone())
            .await
            .unwrap(),
    );
    // A queue created without a declaration counts as declared with none.
    drop(Queue::open(&dir.0, "plain", options()).await.unwrap());
    let err = Queue::open_declared(&dir.0, "plain", options(), strict.clone())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Conflict, "{err}");
    // Out of bounds: refused by name, and nothing is created.
    let err = Queue::open_declared(
        &dir.0,
        "bad",
        options(),
        QueueDeclaration::new().with_max_deliveries(0),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(
            err,
            QueueError::InvalidOption {
                option: "max_deliveries",
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(err.kind(), ErrorKind::InvalidInput);
    assert!(
        !dir.0.join("bad").exists(),
        "a refused declaration created the queue"
    );
    // A dead-letter queue takes its queue's options.
    let err = Queue::open_declared(&dir.0, "strict.dlq", options(), strict)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput, "{err}");
}

#[tokio::test]
async fn a_declared_lease_and_dead_lettering_off_apply() {
    use courier_queue::QueueDeclaration;
    let dir = TempDir::new("declared-lease");
    let declared = QueueDeclaration::new()
        .with_lease(Duration::from_millis(50))
        .with_max_deliveries(1)
        .with_dead_lettering(false);
    let queue = Queue::open_declared(&dir.0, "short", options(), declared)
        .await
        .unwrap();
    queue.enqueue(Message::new("slow")).await.unwrap();
    let mut slow = queue.consumer(1).await.unwrap();
    let mut other = queue.consumer(1).await.unwrap();
    let held = slow.recv().await.unwrap();
    // Far below the host's 30 s lease: only the declared one ends in time.
    let again = tokio::time::timeout(Duration::from_secs(10), other.recv())
        .await
        .expect("the declared 50 ms lease ended")
        .unwrap();
    assert_eq!(
        again.delivery, 2,
        "past max_deliveries, yet not dead-lettered"
    );
    assert!(
        held.ack().await.is_err(),
        "an ack after the lease was accepted"
    );
    again.ack().await.unwrap();
    assert_eq!(queue.stats_now().dead_lettered, 0);
}

#[tokio::test]
async fn reject_dead_letters_at_once_and_on_a_dead_letter_queue_discards() {
    let dir = TempDir::new("reject");
    let queue = Queue::open(&dir.0, "jobs", options()).await.unwrap();
    queue.enqueue(Message::new("poison")).await.unwrap();
    let mut consumer = queue.consumer(1).await.unwrap();
    let delivery = consumer.recv().await.unwrap();
    assert_eq!(
        delivery.delivery, 1,
        "four deliveries left under the default of 5"
    );
    delivery.reject().await.unwrap();
    let stats = queue.stats_now();
    assert_eq!(
        (stats.dead_lettered, stats.depth, stats.in_flight),
        (1, 0, 0)
    );
    let dead = queue.dead_letters().unwrap();
    let mut letters = dead.consumer(1).await.unwrap();
    let letter = letters.recv().await.unwrap();
    let (history, payload) = parse_dead_letter(letter.payload.clone()).unwrap();
    assert_eq!(&payload[..], b"poison");
    assert_eq!(history[0].outcome, DeliveryOutcome::Rejected);
    // Rejecting a dead letter discards it: there is nowhere further to go.
    letter.reject().await.unwrap();
    assert_eq!(dead.stats_now().depth + dead.stats_now().in_flight, 0);
    drop((letters, consumer, dead, queue));
    let reopened = Queue::open(&dir.0, "jobs", options()).await.unwrap();
    let dead = reopened.dead_letters().unwrap();
    assert_eq!(
        (reopened.stats_now().depth, dead.stats_now().depth),
        (0, 0),
        "a rejected message or its dead letter came back after a restart"
    );
}
