//! The reliability core under a simulated network that drops, duplicates,
//! delays and reorders, in both directions, with fixed seeds. Time is
//! simulated: each test jumps from event to event.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::Duration;

use bytes::Bytes;
use courier_messaging::{Inbox, Outbox, OutboxEvent, RetryPolicy, Verdict};
use courier_test_support::Rng;

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Packet {
    Data {
        seq: u64,
        low_water: u64,
        payload: Bytes,
    },
    Ack {
        seq: u64,
    },
}

struct Network {
    rng: Rng,
    loss: f64,
    duplication: f64,
    delay: (Duration, Duration),
    /// (arrival, tie-break, packet)
    in_transit: BinaryHeap<Reverse<(Duration, u64, Packet)>>,
    sent: u64,
    partitioned_until: Duration,
}

impl Network {
    fn new(seed: u64, loss: f64, duplication: f64) -> Network {
        Network {
            rng: Rng(seed),
            loss,
            duplication,
            delay: (Duration::from_millis(1), Duration::from_millis(40)),
            in_transit: BinaryHeap::new(),
            sent: 0,
            partitioned_until: Duration::ZERO,
        }
    }

    fn send(&mut self, now: Duration, packet: Packet) {
        if now < self.partitioned_until || self.rng.chance(self.loss) {
            return;
        }
        let copies = if self.rng.chance(self.duplication) {
            2
        } else {
            1
        };
        for _ in 0..copies {
            // Independent delays reorder packets.
            let arrival = now + self.rng.between(self.delay.0, self.delay.1);
            self.sent += 1;
            self.in_transit
                .push(Reverse((arrival, self.sent, packet.clone())));
        }
    }

    fn next_arrival(&self) -> Option<Duration> {
        self.in_transit.peek().map(|Reverse((t, _, _))| *t)
    }

    fn pop_due(&mut self, now: Duration) -> Option<Packet> {
        if self.next_arrival()? > now {
            return None;
        }
        self.in_transit.pop().map(|Reverse((_, _, p))| p)
    }
}

struct Outcome {
    delivered: Vec<u32>,
    acked: Vec<bool>,
    expired: Vec<bool>,
}

struct Scenario {
    seed: u64,
    messages: u64,
    loss: f64,
    duplication: f64,
    capacity: usize,
    window: u64,
    deadline: Duration,
    restart_receiver_at: Option<Duration>,
    partition: Option<(Duration, Duration)>,
}

impl Scenario {
    fn new(seed: u64) -> Scenario {
        Scenario {
            seed,
            messages: 2_000,
            loss: 0.2,
            duplication: 0.1,
            capacity: 128,
            window: 1024,
            deadline: Duration::from_secs(600),
            restart_receiver_at: None,
            partition: None,
        }
    }

    fn run(&self) -> Outcome {
        let mut data_net = Network::new(self.seed, self.loss, self.duplication);
        let mut ack_net = Network::new(self.seed ^ 0xA5A5_A5A5, self.loss, self.duplication);
        let mut outbox = Outbox::new(self.capacity, RetryPolicy::default());
        let mut inbox: Inbox<u64> = Inbox::new(self.window, 16);
        let n = self.messages as usize;
        let mut outcome = Outcome {
            delivered: vec![0; n],
            acked: vec![false; n],
            expired: vec![false; n],
        };
        let mut now = Duration::ZERO;
        let mut pushed = 0u64;
        let mut restarted = false;
        let mut partitioned = false;
        for step in 0.. {
            assert!(step < 10_000_000, "seed {}: no progress", self.seed);
            if let Some((from, to)) = self.partition {
                if !partitioned && now >= from {
                    data_net.partitioned_until = to;
                    ack_net.partitioned_until = to;
                    partitioned = true;
                }
            }
            if let Some(at) = self.restart_receiver_at {
                if !restarted && now >= at {
                    inbox = Inbox::new(self.window, 16);
                    restarted = true;
                }
            }
            while pushed < self.messages && outbox.has_room() {
                let payload = Bytes::from(pushed.to_le_bytes().to_vec());
                outbox.push(payload, now, now + self.deadline).unwrap();
                pushed += 1;
            }
            while let Some(t) = outbox.poll_transmit(now) {
                data_net.send(
                    now,
                    Packet::Data {
                        seq: t.seq,
                        low_water: t.low_water,
                        payload: t.payload,
                    },
                );
            }
            while let Some(event) = outbox.poll_event() {
                match event {
                    OutboxEvent::Acked { seq, .. } => {
                        assert!(
                            !outcome.acked[seq as usize] && !outcome.expired[seq as usize],
                            "seed {}: two outcomes for {seq}",
                            self.seed
                        );
                        outcome.acked[seq as usize] = true;
                    }
                    OutboxEvent::Rejected { seq, .. } => {
                        panic!("seed {}: {seq} rejected; nothing here rejects", self.seed)
                    }
                    OutboxEvent::Expired { seq, payload, .. } => {
                        assert!(
                            !outcome.acked[seq as usize] && !outcome.expired[seq as usize],
                            "seed {}: two outcomes for {seq}",
                            self.seed
                        );
                        assert_eq!(
                            payload,
                            Bytes::from(seq.to_le_bytes().to_vec()),
                            "the message is handed back"
                        );
                        outcome.expired[seq as usize] = true;
                    }
                }
            }
            if pushed == self.messages && outbox.in_flight() == 0 {
                return outcome;
            }
            let next = [
                outbox.poll_timeout(),
                data_net.next_arrival(),
                ack_net.next_arrival(),
            ]
            .into_iter()
            .flatten()
            .min()
            .expect("something is pending while messages are in flight");
            now = now.max(next);
            outbox.handle_timeout(now);
            while let Some(packet) = data_net.pop_due(now) {
                let Packet::Data {
                    seq,
                    low_water,
                    payload,
                } = packet
                else {
                    unreachable!()
                };
                assert_eq!(
                    payload,
                    Bytes::from(seq.to_le_bytes().to_vec()),
                    "payload matches its sequence number"
                );
                match inbox.handle_data(&1, seq, low_water) {
                    Verdict::Deliver => {
                        outcome.delivered[seq as usize] += 1;
                        ack_net.send(now, Packet::Ack { seq });
                    }
                    Verdict::Duplicate => ack_net.send(now, Packet::Ack { seq }),
                    Verdict::Refuse => {}
                }
            }
            while let Some(packet) = ack_net.pop_due(now) {
                let Packet::Ack { seq } = packet else {
                    unreachable!()
                };
                outbox.handle_ack(seq);
            }
        }
        unreachable!()
    }
}

#[test]
fn lossy_duplicating_reordering_network_delivers_everything_exactly_once() {
    for seed in 0..40 {
        let outcome = Scenario::new(seed).run();
        for (seq, count) in outcome.delivered.iter().enumerate() {
            assert_eq!(
                *count, 1,
                "seed {seed}: message {seq} delivered {count} times"
            );
        }
        assert!(
            outcome.acked.iter().all(|a| *a),
            "seed {seed}: every message acknowledged"
        );
    }
}

#[test]
fn a_small_window_refuses_far_ahead_messages_but_still_delivers_everything_once() {
    for seed in 100..110 {
        let mut scenario = Scenario::new(seed);
        scenario.window = 8;
        scenario.capacity = 64;
        scenario.messages = 500;
        let outcome = scenario.run();
        assert!(outcome.delivered.iter().all(|c| *c == 1), "seed {seed}");
        assert!(outcome.acked.iter().all(|a| *a), "seed {seed}");
    }
}

#[test]
fn a_receiver_restarted_mid_stream_still_gets_everything_at_least_once() {
    for seed in 200..220 {
        let mut scenario = Scenario::new(seed);
        scenario.restart_receiver_at = Some(Duration::from_secs(3));
        let outcome = scenario.run();
        for (seq, count) in outcome.delivered.iter().enumerate() {
            assert!(*count >= 1, "seed {seed}: message {seq} never delivered");
        }
        assert!(outcome.acked.iter().all(|a| *a), "seed {seed}");
    }
}

#[test]
fn a_partition_longer_than_the_deadline_expires_messages_and_the_stream_recovers() {
    for seed in 300..310 {
        let mut scenario = Scenario::new(seed);
        scenario.deadline = Duration::from_secs(20);
        scenario.partition = Some((Duration::from_secs(1), Duration::from_secs(60)));
        let outcome = scenario.run();
        let expired = outcome.expired.iter().filter(|e| **e).count();
        assert!(
            expired > 0,
            "seed {seed}: the partition outlasts the deadline"
        );
        for seq in 0..outcome.delivered.len() {
            // Exactly one outcome per message, and never a double delivery.
            assert!(
                outcome.acked[seq] ^ outcome.expired[seq],
                "seed {seed}: message {seq}"
            );
            assert!(outcome.delivered[seq] <= 1, "seed {seed}: message {seq}");
            if outcome.acked[seq] {
                assert_eq!(
                    outcome.delivered[seq], 1,
                    "seed {seed}: acked message {seq} was delivered"
                );
            }
        }
        // Messages sent after the partition healed all got through: the
        // receiver's window moved past the abandoned ones.
        let last = outcome.acked.len() - 1;
        assert!(outcome.acked[last], "seed {seed}: the stream recovered");
    }
}

#[test]
fn a_perfect_network_needs_no_retransmissions() {
    let mut scenario = Scenario::new(7);
    scenario.loss = 0.0;
    scenario.duplication = 0.0;
    let outcome = scenario.run();
    assert!(outcome.delivered.iter().all(|c| *c == 1));
}
