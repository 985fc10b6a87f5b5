//! A process that enqueues into a durable queue (`FsyncPolicy::Always`)
//! from several tasks at once and prints the id of every enqueue that
//! returned, until it is killed. The crash test kills it with SIGKILL.
//!
//! `courier-log-writer DIR`: the first line printed is `ready`.

use std::io::Write;
use std::sync::Arc;

use bytes::Bytes;
use courier_queue::log::{FsyncPolicy, LogOptions};
use courier_queue::{Message, Queue, QueueOptions};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let dir = std::env::args()
        .nth(1)
        .ok_or_else(|| anyhow::anyhow!("usage: courier-log-writer DIR"))?;
    // Small segments, so a kill can also land during a roll.
    let log = LogOptions::default()
        .with_fsync(FsyncPolicy::Always)
        .with_segment_size(16 * 1024);
    let queue =
        Arc::new(Queue::open(&dir, "crash", QueueOptions::new(log, Default::default())).await?);
    let stdout = Arc::new(std::sync::Mutex::new(std::io::stdout()));
    println!("ready");
    let writers: Vec<_> = (0..4u64)
        .map(|writer| {
            let (queue, stdout) = (queue.clone(), stdout.clone());
            tokio::spawn(async move {
                for n in 0u64.. {
                    let id = writer << 48 | n;
                    let payload = Bytes::from(format!("{id}:{}", "p".repeat((n % 200) as usize)));
                    queue.enqueue(Message::new(payload)).await.expect("enqueue");
                    // Printed only after the enqueue is durable.
                    let mut out = stdout.lock().unwrap();
                    writeln!(out, "{id}").unwrap();
                    out.flush().unwrap();
                }
            })
        })
        .collect();
    for writer in writers {
        writer.await?;
    }
    Ok(())
}
