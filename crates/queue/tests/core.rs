//! Queue semantics, step by step and under a seeded crowd of consumers.

use courier_test_support::Rng;
use std::collections::{HashMap, HashSet};
use std::time::Duration;

use courier_queue::core::{
    DeliveryOutcome, LeaseError, QueueConfig, QueueCore, QueueEvent, MAX_HISTORY,
};

const S: Duration = Duration::from_secs(1);
const T0: Duration = Duration::ZERO;

fn queue(messages: u64) -> QueueCore {
    let mut core = QueueCore::new(
        QueueConfig::default()
            .with_visibility_timeout(10 * S)
            .with_max_deliveries(3),
    );
    for id in 0..messages {
        core.handle_enqueue(id, None, T0, None);
    }
    core
}

#[test]
fn messages_go_out_oldest_first_within_each_consumers_prefetch() {
    let mut core = queue(5);
    core.add_consumer(1, 2);
    let a = core.poll_delivery(1, T0).unwrap();
    let b = core.poll_delivery(1, T0).unwrap();
    assert_eq!((a.id, b.id, a.delivery), (0, 1, 1));
    assert_eq!(core.poll_delivery(1, T0), None, "prefetch of 2 holds");
    core.ack(1, a.id, a.delivery).unwrap();
    assert_eq!(
        core.poll_delivery(1, T0).unwrap().id,
        2,
        "an ack frees credit"
    );
    assert_eq!(core.poll_event(), Some(QueueEvent::Acked(0)));
    let stats = core.stats();
    assert_eq!(
        (
            stats.depth,
            stats.in_flight,
            stats.delivered,
            stats.acknowledged
        ),
        (2, 2, 3, 1)
    );
}

#[test]
fn competing_consumers_share_and_a_slow_one_holds_only_its_prefetch() {
    let mut core = queue(100);
    core.add_consumer(1, 1); // slow: never acks
    core.add_consumer(2, 10);
    core.add_consumer(3, 10);
    let mut got: HashMap<u64, u32> = HashMap::new();
    for _ in 0..100 {
        for consumer in [1, 2, 3] {
            if let Some(d) = core.poll_delivery(consumer, T0) {
                *got.entry(consumer).or_default() += 1;
                if consumer != 1 {
                    core.ack(consumer, d.id, d.delivery).unwrap();
                }
            }
        }
    }
    assert_eq!(got[&1], 1, "the slow consumer holds one message");
    assert_eq!(got[&2] + got[&3], 99, "the others take the rest");
    assert!(got[&2] > 30 && got[&3] > 30, "and share it: {got:?}");
}

#[test]
fn an_expired_lease_goes_to_another_consumer_and_the_late_ack_is_refused() {
    let mut core = queue(1);
    core.add_consumer(1, 1);
    core.add_consumer(2, 1);
    let first = core.poll_delivery(1, T0).unwrap();
    assert_eq!(core.poll_timeout(T0), Some(10 * S));
    core.handle_timeout(10 * S);
    let second = core.poll_delivery(2, 10 * S).unwrap();
    assert_eq!((second.id, second.delivery), (0, 2));
    assert_eq!(
        core.ack(1, first.id, first.delivery),
        Err(LeaseError::NotLeased { id: 0, delivery: 1 })
    );
    assert_eq!(core.stats().redelivered, 1);
    core.ack(2, second.id, second.delivery).unwrap();
}

#[test]
fn extend_keeps_a_lease_alive() {
    let mut core = queue(1);
    core.add_consumer(1, 1);
    let d = core.poll_delivery(1, T0).unwrap();
    assert_eq!(
        core.extend(1, d.id, d.delivery, 30 * S, 9 * S).unwrap(),
        39 * S
    );
    core.handle_timeout(20 * S);
    assert_eq!(core.stats().in_flight, 1, "still leased");
    core.ack(1, d.id, d.delivery).unwrap();
}

#[test]
fn nack_with_delay_comes_back_by_itself_after_the_delay() {
    let mut core = queue(3);
    core.add_consumer(1, 3);
    let all: Vec<_> = (0..3).map(|_| core.poll_delivery(1, T0).unwrap()).collect();
    for d in &all {
        core.nack(1, d.id, d.delivery, 5 * S, T0).unwrap();
    }
    assert_eq!(core.poll_delivery(1, 4 * S), None, "not before the delay");
    assert_eq!(
        core.poll_timeout(4 * S),
        Some(5 * S),
        "the caller knows when to look again"
    );
    assert_eq!(
        core.poll_timeout(5 * S),
        None,
        "ready messages need no timer"
    );
    let again = core.poll_delivery(1, 5 * S).unwrap();
    assert_eq!(
        (again.id, again.delivery),
        (0, 2),
        "the same consumer resumes, no restart needed"
    );
}

#[test]
fn a_message_delivered_max_times_is_dead_lettered_with_its_history() {
    let mut core = queue(1);
    core.add_consumer(1, 1);
    core.add_consumer(2, 1);
    let d1 = core.poll_delivery(1, T0).unwrap();
    core.nack(1, d1.id, d1.delivery, Duration::ZERO, S).unwrap();
    let d2 = core.poll_delivery(2, 2 * S).unwrap();
    core.handle_timeout(12 * S); // lease expires
    let d3 = core.poll_delivery(1, 13 * S).unwrap();
    assert_eq!(d3.delivery, 3);
    core.remove_consumer(1, 14 * S); // consumer gone: the third delivery ends
    assert_eq!(
        core.poll_delivery(2, 15 * S),
        None,
        "not delivered a fourth time"
    );
    let Some(QueueEvent::DeadLettered { id, history }) = core.poll_event() else {
        panic!("dead-lettered")
    };
    assert_eq!(id, 0);
    let outcomes: Vec<_> = history.iter().map(|h| (h.consumer, h.outcome)).collect();
    assert_eq!(
        outcomes,
        [
            (1, DeliveryOutcome::Nacked),
            (2, DeliveryOutcome::LeaseExpired),
            (1, DeliveryOutcome::ConsumerGone)
        ]
    );
    assert_eq!((d2.delivery, core.stats().dead_lettered), (2, 1));
}

#[test]
fn time_to_live_and_delay_are_honoured() {
    let mut core = QueueCore::new(QueueConfig::default());
    core.handle_enqueue(0, None, T0, Some(5 * S)); // expires at 5 s
    core.handle_enqueue(1, None, 3 * S, None); // ready at 3 s
    core.add_consumer(1, 10);
    assert_eq!(core.poll_delivery(1, 2 * S).unwrap().id, 0);
    assert_eq!(core.poll_delivery(1, 2 * S), None, "1 is delayed");
    assert_eq!(core.poll_delivery(1, 3 * S).unwrap().id, 1);
    core.handle_timeout(5 * S);
    assert_eq!(
        core.poll_event(),
        Some(QueueEvent::Expired(0)),
        "even while leased, a TTL ends it"
    );
    assert_eq!(core.stats().expired, 1);
}

#[test]
fn idempotency_keys_are_remembered_within_the_window() {
    let mut config = QueueConfig::default();
    config.dedup_window = 2;
    let mut core = QueueCore::new(config);
    core.handle_enqueue(0, Some("a".into()), T0, None);
    core.handle_enqueue(1, Some("b".into()), T0, None);
    assert_eq!(core.duplicate_of("a"), Some(0));
    core.handle_enqueue(2, Some("c".into()), T0, None);
    assert_eq!(core.duplicate_of("a"), None, "pushed out of the window");
    assert_eq!(core.duplicate_of("c"), Some(2));
    assert_eq!(core.stats().duplicates, 2);
}

#[test]
fn sixteen_consumers_with_expiring_leases_never_share_a_delivery() {
    for seed in 0..20 {
        let mut rng = Rng(seed);
        let messages = 500;
        let mut core = queue(messages);
        for consumer in 0..16 {
            core.add_consumer(consumer, 1 + rng.below(4) as usize);
        }
        let mut now = T0;
        let mut held: HashMap<u64, Vec<(u64, u32)>> = HashMap::new(); // consumer -> (id, delivery)
        let mut handed_out = HashSet::new();
        let mut ended = HashSet::new();
        for _ in 0..20_000 {
            now += Duration::from_millis(rng.below(2000));
            core.handle_timeout(now);
            let consumer = rng.below(16);
            match rng.below(10) {
                0..=4 => {
                    if let Some(d) = core.poll_delivery(consumer, now) {
                        assert!(
                            handed_out.insert((d.id, d.delivery)),
                            "seed {seed}: ({}, {}) handed out twice",
                            d.id,
                            d.delivery
                        );
                        held.entry(consumer).or_default().push((d.id, d.delivery));
                    }
                }
                5..=7 => {
                    if let Some((id, delivery)) = held.get_mut(&consumer).and_then(|h| h.pop()) {
                        // May be refused: the lease may have expired meanwhile.
                        let _ = core.ack(consumer, id, delivery);
                    }
                }
                _ => {
                    if let Some((id, delivery)) = held.get_mut(&consumer).and_then(|h| h.pop()) {
                        let _ = core.nack(
                            consumer,
                            id,
                            delivery,
                            Duration::from_millis(rng.below(5000)),
                            now,
                        );
                    }
                }
            }
            while let Some(event) = core.poll_event() {
                let id = match event {
                    QueueEvent::Acked(id) | QueueEvent::Expired(id) => id,
                    QueueEvent::DeadLettered { id, .. } => id,
                };
                assert!(ended.insert(id), "seed {seed}: message {id} ended twice");
            }
            // At most one live lease per message.
            let stats = core.stats();
            assert!(
                stats.in_flight + stats.depth + ended.len() as u64 == messages,
                "seed {seed}: messages conserved"
            );
        }
    }
}

#[test]
fn an_answer_after_the_lease_ended_is_refused_before_any_timeout_runs() {
    let mut core = queue(1);
    core.add_consumer(1, 1);
    let d = core.poll_delivery(1, T0).unwrap();
    // handle_timeout has not run: the message is still marked leased.
    let late = d.lease_until;
    let refused = Err(LeaseError::NotLeased {
        id: d.id,
        delivery: d.delivery,
    });
    assert_eq!(core.ack_at(1, d.id, d.delivery, late), refused);
    assert_eq!(
        core.nack(1, d.id, d.delivery, Duration::ZERO, late),
        refused
    );
    assert_eq!(
        core.extend(1, d.id, d.delivery, S, late).map(|_| ()),
        refused
    );
    // Just before the end it is still the consumer's.
    core.ack_at(1, d.id, d.delivery, late - Duration::from_nanos(1))
        .unwrap();
}

#[test]
fn without_dead_lettering_a_message_comes_back_however_often_it_is_nacked() {
    let mut core = QueueCore::new(
        QueueConfig::default()
            .with_max_deliveries(2)
            .with_dead_lettering(false),
    );
    core.handle_enqueue(7, None, T0, None);
    core.add_consumer(1, 1);
    for round in 1..=10 {
        let d = core.poll_delivery(1, T0).unwrap();
        assert_eq!(d.delivery, round);
        core.nack(1, d.id, d.delivery, Duration::ZERO, T0).unwrap();
    }
    assert_eq!(core.poll_event(), None, "never dead-lettered");
    assert_eq!(core.stats().depth, 1);
}

#[test]
fn a_consumer_holding_a_hundred_thousand_still_gets_deliveries() {
    const HELD: u64 = 100_000;
    let mut core = queue(HELD + 10);
    core.add_consumer(1, HELD as usize + 10);
    for _ in 0..HELD {
        core.poll_delivery(1, T0).unwrap();
    }
    assert_eq!(core.stats().in_flight, HELD);
    for n in 0..10 {
        let d = core.poll_delivery(1, T0).unwrap();
        assert_eq!(d.id, HELD + n);
        core.ack_at(1, d.id, d.delivery, T0).unwrap();
    }
}

#[test]
fn purge_removes_what_waits_and_leaves_what_is_leased() {
    let mut core = queue(5);
    core.handle_enqueue(5, None, 100 * S, None); // delayed
    core.add_consumer(1, 2);
    let held = core.poll_delivery(1, T0).unwrap();
    let mut purged = core.purge();
    purged.sort();
    assert_eq!(purged, [1, 2, 3, 4, 5]);
    assert_eq!((core.stats().depth, core.stats().in_flight), (0, 1));
    core.ack_at(1, held.id, held.delivery, T0).unwrap();
    assert_eq!(core.poll_timeout(T0), None, "nothing left to wait for");
}

#[test]
fn peek_shows_what_a_consumer_would_get_next_and_changes_nothing() {
    let mut core = queue(4);
    core.handle_enqueue(4, None, 100 * S, None); // delayed
    core.add_consumer(1, 1);
    let held = core.poll_delivery(1, T0).unwrap();
    assert_eq!(held.id, 0);
    // Leased and delayed messages are not shown; the rest in order.
    assert_eq!(core.peek(T0, 10), [(1, 0), (2, 0), (3, 0)]);
    assert_eq!(core.peek(T0, 2), [(1, 0), (2, 0)]);
    assert_eq!(core.peek(T0, 0), []);
    let before = core.stats();
    assert_eq!(core.peek(T0, 10).len(), 3);
    assert_eq!(core.stats(), before, "peeking counts nothing");
    assert_eq!(core.poll_event(), None);
    // A message given back shows its earlier delivery; a delayed one shows
    // once it is due.
    core.nack(1, held.id, held.delivery, Duration::ZERO, T0)
        .unwrap();
    assert_eq!(core.peek(T0, 10), [(0, 1), (1, 0), (2, 0), (3, 0)]);
    assert_eq!(core.peek(100 * S, 10).last(), Some(&(4, 0)));
    // The consumer still gets exactly what peek showed first.
    assert_eq!(core.poll_delivery(1, T0).unwrap().id, 0);
}

/// In a queue that never dead-letters a message may come back for ever:
/// its history keeps only the latest deliveries, and a rejection at the
/// end still names itself last.
#[test]
fn a_message_delivered_without_end_keeps_a_bounded_history() {
    let mut core = QueueCore::new(QueueConfig::default().with_dead_lettering(false));
    core.handle_enqueue(0, None, T0, None);
    core.add_consumer(1, 1);
    let times = MAX_HISTORY as u32 + 5;
    for n in 0..times {
        let d = core.poll_delivery(1, T0).expect("delivered again");
        assert_eq!(d.delivery, n + 1);
        if n + 1 < times {
            core.nack(1, d.id, d.delivery, Duration::ZERO, T0).unwrap();
        } else {
            core.reject(1, d.id, d.delivery, T0).unwrap();
        }
    }
    let history = loop {
        match core.poll_event() {
            Some(QueueEvent::DeadLettered { history, .. }) => break history,
            Some(_) => continue,
            None => panic!("no dead letter"),
        }
    };
    assert_eq!(history.len(), MAX_HISTORY);
    assert_eq!(history.last().unwrap().outcome, DeliveryOutcome::Rejected);
    assert!(history[..MAX_HISTORY - 1]
        .iter()
        .all(|r| r.outcome == DeliveryOutcome::Nacked));
}
