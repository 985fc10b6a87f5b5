//! The durable queue under `kill -9`: a child process enqueues with
//! `Always` and reports every enqueue that returned; the parent kills it at
//! a seeded random moment, then checks that the log has no corruption and
//! that every reported message is in the reopened queue, exactly once.

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use courier_queue::log::{Log, LogOptions};
use courier_queue::{Queue, QueueOptions};

const WRITER: &str = env!("CARGO_BIN_EXE_courier-log-writer");

fn seeds() -> std::ops::Range<u64> {
    // A handful on every `cargo test`; `COURIER_CRASH_SEEDS=200` for a long run.
    let count = std::env::var("COURIER_CRASH_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    0..count
}

#[test]
fn acknowledged_enqueues_survive_kill_minus_nine() {
    for seed in seeds() {
        let dir = std::env::temp_dir().join(format!("courier-crash-{}-{seed}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut child = Command::new(WRITER)
            .arg(&dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        assert_eq!(lines.next().unwrap().unwrap(), "ready", "seed {seed}");
        // Kill after a seeded number of acknowledged appends (50..1000).
        let kill_after = 50 + (seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 33) % 950;
        let mut acknowledged = HashSet::new();
        for line in lines.by_ref() {
            acknowledged.insert(line.unwrap().parse::<u64>().unwrap());
            if acknowledged.len() as u64 >= kill_after {
                break;
            }
        }
        child.kill().unwrap();
        child.wait().unwrap();
        // Lines written before the kill but not yet read are acknowledged too.
        for line in lines {
            let Ok(line) = line else { break };
            if let Ok(id) = line.parse::<u64>() {
                acknowledged.insert(id);
            }
        }

        // The files: nothing corrupt (a torn last record is cut, and fine).
        let (log, recovery) = Log::open(dir.join("crash"), LogOptions::default(), |_| {}).unwrap();
        assert!(
            recovery.corruption.is_empty(),
            "seed {seed}: {:?}",
            recovery.corruption
        );
        drop(log);
        // The queue: every acknowledged enqueue is a message, once.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let found: Vec<u64> = runtime.block_on(async {
            let queue = Queue::open(&dir, "crash", QueueOptions::default())
                .await
                .unwrap();
            let consumer = queue.consumer(u32::MAX).await.unwrap();
            let mut found = Vec::new();
            while let Some(delivery) = consumer.try_recv() {
                let text = std::str::from_utf8(&delivery.payload).expect("intact payload");
                let (id, padding) = text.split_once(':').expect("a whole message");
                assert!(padding.bytes().all(|b| b == b'p'));
                found.push(id.parse().unwrap());
            }
            found
        });
        let unique: HashSet<_> = found.iter().copied().collect();
        assert_eq!(
            unique.len(),
            found.len(),
            "seed {seed}: an append appears twice"
        );
        let missing: Vec<_> = acknowledged.difference(&unique).collect();
        assert!(
            missing.is_empty(),
            "seed {seed}: acknowledged but lost: {missing:?}"
        );
        println!(
            "seed {seed}: killed after {} acknowledged enqueues; {} in the queue, {} torn bytes cut",
            acknowledged.len(),
            found.len(),
            recovery.truncated_bytes
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
