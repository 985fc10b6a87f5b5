//! The reliability and correlation cores, step by step.

use std::collections::HashSet;
use std::time::Duration;

use bytes::Bytes;
use courier_messaging::{DedupWindow, Outbox, OutboxEvent, Requests, RetryPolicy, Verdict};
use proptest::prelude::*;

const MS: Duration = Duration::from_millis(1);

fn policy() -> RetryPolicy {
    RetryPolicy {
        initial: 100 * MS,
        max: 1000 * MS,
    }
}

#[test]
fn retransmissions_back_off_exponentially_up_to_the_cap() {
    let mut outbox = Outbox::new(4, policy());
    outbox
        .push(Bytes::from_static(b"m"), Duration::ZERO, 10_000 * MS)
        .unwrap();
    let mut now = Duration::ZERO;
    let mut gaps = Vec::new();
    for attempt in 1..=7 {
        let t = outbox.poll_transmit(now).expect("due");
        assert_eq!(t.attempt, attempt);
        assert!(outbox.poll_transmit(now).is_none(), "not due twice");
        let next = outbox.poll_timeout().unwrap();
        gaps.push(next - now);
        now = next;
    }
    assert_eq!(
        gaps,
        [100, 200, 400, 800, 1000, 1000, 1000].map(|ms| ms * MS)
    );
}

#[test]
fn a_full_outbox_hands_the_message_back() {
    let mut outbox = Outbox::new(2, policy());
    outbox
        .push(Bytes::from_static(b"a"), Duration::ZERO, MS)
        .unwrap();
    outbox
        .push(Bytes::from_static(b"b"), Duration::ZERO, MS)
        .unwrap();
    assert!(!outbox.has_room());
    assert_eq!(
        outbox.push(Bytes::from_static(b"c"), Duration::ZERO, MS),
        Err(Bytes::from_static(b"c"))
    );
    outbox.handle_ack(0);
    assert_eq!(
        outbox.push(Bytes::from_static(b"c"), Duration::ZERO, MS),
        Ok(2)
    );
}

#[test]
fn each_message_gets_exactly_one_outcome() {
    let mut outbox = Outbox::new(8, policy());
    for _ in 0..3 {
        outbox
            .push(Bytes::from_static(b"x"), Duration::ZERO, 500 * MS)
            .unwrap();
    }
    while outbox.poll_transmit(Duration::ZERO).is_some() {}
    outbox.handle_ack(1);
    outbox.handle_ack(1); // duplicate ack
    outbox.handle_ack(99); // unknown
    outbox.handle_timeout(500 * MS);
    outbox.handle_ack(0); // too late: already expired
    let events: Vec<_> = std::iter::from_fn(|| outbox.poll_event()).collect();
    assert_eq!(events.len(), 3);
    assert_eq!(
        events[0],
        OutboxEvent::Acked {
            seq: 1,
            attempts: 1
        }
    );
    assert!(matches!(events[1], OutboxEvent::Expired { seq: 0, .. }));
    assert!(matches!(events[2], OutboxEvent::Expired { seq: 2, .. }));
    assert_eq!(outbox.in_flight(), 0);
    assert_eq!(outbox.poll_timeout(), None);
    assert_eq!(outbox.next_deadline(), None);
}

#[test]
fn low_water_tracks_the_oldest_unfinished_message() {
    let mut outbox = Outbox::new(8, policy());
    for _ in 0..3 {
        outbox
            .push(Bytes::new(), Duration::ZERO, 1000 * MS)
            .unwrap();
    }
    assert_eq!(outbox.low_water(), 0);
    outbox.handle_ack(1);
    assert_eq!(outbox.low_water(), 0);
    outbox.handle_ack(0);
    assert_eq!(outbox.low_water(), 2);
    outbox.handle_ack(2);
    assert_eq!(
        outbox.low_water(),
        3,
        "nothing in flight: the next sequence number"
    );
}

#[test]
fn retransmit_all_makes_everything_due_now_with_fresh_backoff() {
    let mut outbox = Outbox::new(8, policy());
    outbox
        .push(Bytes::new(), Duration::ZERO, 100_000 * MS)
        .unwrap();
    outbox
        .push(Bytes::new(), Duration::ZERO, 100_000 * MS)
        .unwrap();
    let mut now = Duration::ZERO;
    for _ in 0..10 {
        while outbox.poll_transmit(now).is_some() {}
        now = outbox.poll_timeout().unwrap();
    }
    outbox.retransmit_all(now);
    let due: Vec<_> = std::iter::from_fn(|| outbox.poll_transmit(now))
        .map(|t| t.seq)
        .collect();
    assert_eq!(due, [0, 1]);
    assert_eq!(
        outbox.poll_timeout(),
        Some(now + 200 * MS),
        "backoff restarted"
    );
}

proptest! {
    /// The window against a plain model: a set of everything delivered and
    /// the highest low-water mark seen.
    #[test]
    fn dedup_window_never_delivers_twice_and_stays_bounded(
        window in 1u64..32,
        ops in proptest::collection::vec((0u64..120, 0u64..4), 1..400),
    ) {
        let mut dedup = DedupWindow::new(window);
        let mut delivered = HashSet::new();
        let mut low_water = 0u64;
        for (seq, bump) in ops {
            low_water += bump / 3; // mostly steady, sometimes rising
            let verdict = dedup.observe(seq, low_water);
            let mut floor = low_water;
            // The model's floor: the low-water mark, raised past a prefix of delivered numbers.
            while delivered.contains(&floor) { floor += 1; }
            let expected = if seq < low_water || delivered.contains(&seq) {
                Verdict::Duplicate
            } else if seq >= floor + window {
                Verdict::Refuse
            } else {
                Verdict::Deliver
            };
            prop_assert_eq!(verdict, expected, "seq {} low-water {}", seq, low_water);
            if verdict == Verdict::Deliver {
                prop_assert!(delivered.insert(seq));
            }
            prop_assert!(dedup.remembered() as u64 <= window);
        }
    }
}

#[test]
fn an_inbox_forgets_the_least_recently_used_stream_first() {
    let mut inbox = courier_messaging::Inbox::new(16, 2);
    assert_eq!(inbox.handle_data(&"a", 0, 0), Verdict::Deliver);
    assert_eq!(inbox.handle_data(&"b", 0, 0), Verdict::Deliver);
    assert_eq!(inbox.handle_data(&"a", 0, 0), Verdict::Duplicate); // a is now the most recent
    assert_eq!(inbox.handle_data(&"c", 0, 0), Verdict::Deliver); // evicts b
    assert_eq!(inbox.streams(), 2);
    assert_eq!(
        inbox.handle_data(&"a", 0, 0),
        Verdict::Duplicate,
        "a was kept"
    );
    assert_eq!(
        inbox.handle_data(&"b", 0, 0),
        Verdict::Deliver,
        "b was forgotten"
    );
}

#[test]
fn replies_match_in_any_order_and_late_ones_find_nobody() {
    let mut requests = Requests::new(3);
    let a = requests.start("a", 100 * MS).unwrap();
    let b = requests.start("b", 50 * MS).unwrap();
    let c = requests.start("c", 200 * MS).unwrap();
    assert_eq!(requests.start("d", MS), Err("d"), "full");
    assert_eq!(requests.complete(c), Some("c"));
    assert_eq!(requests.complete(a), Some("a"));
    assert_eq!(requests.complete(a), None, "a second reply");
    assert_eq!(requests.complete(999), None, "an unknown id");
    assert_eq!(requests.poll_timeout(), Some(50 * MS));
    assert_eq!(requests.poll_expired(49 * MS), None);
    assert_eq!(requests.poll_expired(50 * MS), Some((b, "b")));
    assert_eq!(requests.complete(b), None, "a reply after the timeout");
    assert!(requests.is_empty());
    let d = requests.start("d", MS).unwrap();
    assert!(d > c, "ids are never reused");
    let e = requests.start("e", MS).unwrap();
    let mut gone: Vec<_> = requests.drain().collect();
    gone.sort();
    assert_eq!(gone, [(d, "d"), (e, "e")]);
    assert_eq!(requests.poll_timeout(), None);
}
