//! The durable log: appends of 256-byte records with 1, 4 and 16 concurrent
//! producers under each fsync policy, beside the physical limits of the
//! same disk measured in the same run (raw fsync rate, raw sequential
//! write), the time to recover a log of a million records, and (`remote`) a
//! queue host and its client in one process over unix:// and tcp://: single
//! enqueues with 256 outstanding on one connection, then consume + ack,
//! beside the disk's rate at one fdatasync per 256 records.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use courier_benches::{filters, output_dir, selected, Mode, Placement, Report};
use courier_queue::log::{FsyncPolicy, Log, LogOptions};

const SIZE: usize = 256;

fn scratch(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("courier-bench-log-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// fdatasyncs per second of 256-byte appends: the ceiling for `Always`.
fn raw_fsync_rate(duration: Duration) -> f64 {
    let dir = scratch("raw-fsync");
    std::fs::create_dir_all(&dir).unwrap();
    let mut file = std::fs::File::create(dir.join("raw")).unwrap();
    let record = [0xA5u8; SIZE];
    let started = Instant::now();
    let mut count = 0u64;
    while started.elapsed() < duration {
        file.write_all(&record).unwrap();
        file.sync_data().unwrap();
        count += 1;
    }
    let rate = count as f64 / started.elapsed().as_secs_f64();
    let _ = std::fs::remove_dir_all(&dir);
    rate
}

/// 256-byte records per second written sequentially through a 64 KiB
/// buffer, no fsync: the ceiling for `Never`.
fn raw_write_rate(records: u64) -> f64 {
    let dir = scratch("raw-write");
    std::fs::create_dir_all(&dir).unwrap();
    let file = std::fs::File::create(dir.join("raw")).unwrap();
    let mut writer = std::io::BufWriter::with_capacity(64 * 1024, file);
    let record = [0xA5u8; SIZE + 17];
    let started = Instant::now();
    for _ in 0..records {
        writer.write_all(&record).unwrap();
    }
    writer.flush().unwrap();
    let rate = records as f64 / started.elapsed().as_secs_f64();
    let _ = std::fs::remove_dir_all(&dir);
    rate
}

fn append_rate(
    runtime: &tokio::runtime::Runtime,
    policy: FsyncPolicy,
    producers: usize,
    duration: Duration,
) -> (f64, f64) {
    let dir = scratch("append");
    let (log, _) = Log::open(&dir, LogOptions::default().with_fsync(policy), |_| {}).unwrap();
    let log = Arc::new(log);
    let appended = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    runtime.block_on(async {
        let tasks: Vec<_> = (0..producers)
            .map(|_| {
                let (log, appended) = (log.clone(), appended.clone());
                tokio::spawn(async move {
                    let payload = Bytes::from(vec![0xA5u8; SIZE]);
                    while started.elapsed() < duration {
                        log.append(1, payload.clone()).await.unwrap();
                        appended.fetch_add(1, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
    });
    let elapsed = started.elapsed().as_secs_f64();
    let count = appended.load(Ordering::Relaxed) as f64;
    let per_fsync = count / log.fsyncs().max(1) as f64;
    drop(log);
    let _ = std::fs::remove_dir_all(&dir);
    (count / elapsed, per_fsync)
}

fn recovery_time(records: u64) -> (Duration, u64) {
    let dir = scratch("recovery");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (log, _) = Log::open(
        &dir,
        LogOptions::default().with_fsync(FsyncPolicy::Never),
        |_| {},
    )
    .unwrap();
    runtime.block_on(async {
        let payload = Bytes::from(vec![0xA5u8; SIZE]);
        for chunk in 0..records / 1000 {
            let _ = chunk;
            log.append_batch(vec![(1, payload.clone()); 1000])
                .await
                .unwrap();
        }
    });
    log.close();
    let started = Instant::now();
    let mut replayed = 0u64;
    let (_log, _) = Log::open(&dir, LogOptions::default(), |_| replayed += 1).unwrap();
    let took = started.elapsed();
    let _ = std::fs::remove_dir_all(&dir);
    (took, replayed)
}

/// Enqueue → consume → ack of `count` messages through one face of the
/// queue API (the same code for embedded and remote); messages per second.
async fn end_to_end<Q: courier_queue::QueueHandle + 'static>(queue: Arc<Q>, count: u64) -> f64 {
    use courier_queue::{ConsumerHandle, DeliveryHandle, Message};
    let started = Instant::now();
    let producer = {
        let queue = queue.clone();
        tokio::spawn(async move {
            let payload = Bytes::from(vec![0xA5u8; SIZE]);
            for _ in 0..count / 100 {
                let batch = (0..100).map(|_| Message::new(payload.clone())).collect();
                queue.enqueue_batch(batch).await.unwrap();
            }
        })
    };
    let mut consumer = queue.consumer(256).await.unwrap();
    for _ in 0..count / 100 * 100 {
        consumer.recv().await.unwrap().ack().await.unwrap();
    }
    producer.await.unwrap();
    count as f64 / started.elapsed().as_secs_f64()
}

/// fdatasyncs of 256 records written at once, as records per second: the
/// ceiling for a group commit that shares one fsync among 256 appends.
fn raw_batched_fsync_rate(duration: Duration, per_fsync: usize) -> f64 {
    let dir = scratch("raw-batched");
    std::fs::create_dir_all(&dir).unwrap();
    let mut file = std::fs::File::create(dir.join("raw")).unwrap();
    let batch = vec![0xA5u8; (SIZE + 17) * per_fsync];
    let started = Instant::now();
    let mut count = 0u64;
    while started.elapsed() < duration {
        file.write_all(&batch).unwrap();
        file.sync_data().unwrap();
        count += per_fsync as u64;
    }
    let rate = count as f64 / started.elapsed().as_secs_f64();
    let _ = std::fs::remove_dir_all(&dir);
    rate
}

/// Outstanding single enqueues in the remote workload.
const OUTSTANDING: usize = 256;

/// A queue host on `address` in this runtime and a client of it: enqueues of
/// single 256-byte messages with [`OUTSTANDING`] in flight on one
/// connection, then consume + ack of all of them (prefetch 256, acks in
/// flight while the next deliveries arrive). Messages per second of each.
async fn remote_queue(address: &str, policy: FsyncPolicy, count: u64) -> (f64, f64) {
    use courier_queue::remote::{QueueHost, QueueServiceServer, RemoteQueue};
    use courier_queue::Message;
    let dir = scratch("remote");
    let options = courier_queue::QueueOptions::new(
        LogOptions::default().with_fsync(policy),
        Default::default(),
    );
    let listener = courier_transport::bind(&address.parse().unwrap(), &Default::default())
        .await
        .unwrap();
    let server = courier_rpc::Server::new(courier_rpc::ServerConfig::default())
        .service(QueueServiceServer::new(QueueHost::new(
            dir.join("host"),
            options,
        )))
        .spawn(listener);
    let queue = RemoteQueue::connect(
        server.local_addr(),
        "bench",
        courier_rpc::ClientConfig::default(),
    )
    .await
    .unwrap();
    let payload = Bytes::from(vec![0xA5u8; SIZE]);
    // Warm up: the queue is opened (created) by the first call.
    queue.enqueue(Message::new(payload.clone())).await.unwrap();
    let started = Instant::now();
    let producers: Vec<_> = (0..OUTSTANDING)
        .map(|i| {
            let (queue, payload) = (queue.clone(), payload.clone());
            let mine =
                count / OUTSTANDING as u64 + u64::from((i as u64) < count % OUTSTANDING as u64);
            tokio::spawn(async move {
                for _ in 0..mine {
                    queue.enqueue(Message::new(payload.clone())).await.unwrap();
                }
            })
        })
        .collect();
    for producer in producers {
        producer.await.unwrap();
    }
    let enqueue = count as f64 / started.elapsed().as_secs_f64();
    let started = Instant::now();
    let mut consumer = queue.consumer(256).await.unwrap();
    let mut acks: tokio::task::JoinSet<Result<(), courier_queue::remote::RemoteQueueError>> =
        tokio::task::JoinSet::new();
    for _ in 0..count + 1 {
        let delivery = consumer.recv().await.unwrap();
        if acks.len() >= 256 {
            acks.join_next().await.unwrap().unwrap().unwrap();
        }
        acks.spawn(delivery.ack());
    }
    while let Some(done) = acks.join_next().await {
        done.unwrap().unwrap();
    }
    let consume = count as f64 / started.elapsed().as_secs_f64();
    drop(consumer);
    drop(queue);
    server.shutdown(Duration::from_secs(1)).await;
    let _ = std::fs::remove_dir_all(&dir);
    (enqueue, consume)
}

fn main() -> anyhow::Result<()> {
    let mode = Mode::from_args();
    let duration = mode.pick(Duration::from_secs(2), Duration::from_millis(100));
    let filters = filters();
    let mut report = Report::default();
    let place = Placement::Same; // disk workloads: placement does not apply; labelled "same"
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    println!("durable log benchmarks ({mode:?}): {SIZE}-byte records, {duration:?} per figure\n");

    if selected(&filters, "append") {
        let fsync_rate = raw_fsync_rate(duration);
        let write_rate = raw_write_rate(mode.pick(2_000_000, 20_000));
        println!("raw disk: {fsync_rate:.0} fsyncs/s (write + fdatasync of {SIZE} B); {write_rate:.0} records/s sequential write ({:.0} MB/s)", write_rate * (SIZE + 17) as f64 / 1e6);
        report.add("raw_disk", "fsync", place, "per_s", fsync_rate);
        report.add("raw_disk", "write", place, "records_per_s", write_rate);
        println!(
            "\n{:<20} {:>10} {:>14} {:>14} {:>16}",
            "policy", "producers", "appends/s", "per fsync", "vs raw limit"
        );
        for (name, policy, limit, limit_name) in [
            ("always", FsyncPolicy::Always, fsync_rate, "fsync rate"),
            (
                "interval(5ms)",
                FsyncPolicy::Interval(Duration::from_millis(5)),
                write_rate,
                "write rate",
            ),
            ("never", FsyncPolicy::Never, write_rate, "write rate"),
        ] {
            for producers in [1, 4, 16] {
                let (rate, per_fsync) = append_rate(&runtime, policy, producers, duration);
                let ratio = rate / limit;
                let per_fsync_text = if policy == FsyncPolicy::Always {
                    format!("{per_fsync:.1}")
                } else {
                    "-".into()
                };
                println!("{name:<20} {producers:>10} {rate:>14.0} {per_fsync_text:>14} {ratio:>10.2}x {limit_name}");
                let subject = format!("{name}/{producers}p");
                report.add("append_256B", &subject, place, "appends_per_s", rate);
                report.add(
                    "append_256B",
                    &subject,
                    place,
                    "appends_per_fsync",
                    per_fsync,
                );
                report.ratio("append_256B", &subject, place, ratio, f64::NAN, true);
            }
        }
    }
    if selected(&filters, "end_to_end") {
        use courier_queue::remote::{QueueHost, QueueServiceServer, RemoteQueue};
        let options = || {
            courier_queue::QueueOptions::new(
                LogOptions::default().with_fsync(FsyncPolicy::Interval(Duration::from_millis(5))),
                Default::default(),
            )
        };
        let embedded_count = mode.pick(200_000, 1_000);
        let remote_count = mode.pick(50_000, 1_000);
        let dir = scratch("e2e");
        let embedded = runtime.block_on(async {
            let queue = Arc::new(
                courier_queue::Queue::open(&dir, "e2e", options())
                    .await
                    .unwrap(),
            );
            end_to_end(queue, embedded_count).await
        });
        let remote = runtime.block_on(async {
            let listener =
                courier_transport::bind(&"tcp://127.0.0.1:0".parse().unwrap(), &Default::default())
                    .await
                    .unwrap();
            let server = courier_rpc::Server::new(courier_rpc::ServerConfig::default())
                .service(QueueServiceServer::new(QueueHost::new(
                    dir.join("host"),
                    options(),
                )))
                .spawn(listener);
            let queue = RemoteQueue::connect(
                server.local_addr(),
                "e2e",
                courier_rpc::ClientConfig::default(),
            )
            .await
            .unwrap();
            end_to_end(Arc::new(queue), remote_count).await
        });
        let _ = std::fs::remove_dir_all(&dir);
        println!("\nend to end (enqueue in batches of 100, consume, ack one by one; interval(5ms) fsync):");
        println!("  embedded:           {embedded:>10.0} msgs/s");
        println!("  over loopback TCP:  {remote:>10.0} msgs/s");
        report.add("end_to_end", "embedded", place, "msgs_per_s", embedded);
        report.add("end_to_end", "remote-tcp", place, "msgs_per_s", remote);
    }
    if selected(&filters, "remote") {
        let count = mode.pick(100_000, 2_000);
        let batched = raw_batched_fsync_rate(duration, 256);
        println!("\nraw disk: {batched:.0} records/s ({SIZE} B, one fdatasync per 256)");
        report.add("raw_disk", "fsync_per_256", place, "records_per_s", batched);
        println!(
            "remote queue, one process: {count} single enqueues of {SIZE} B with {OUTSTANDING} outstanding on one connection, then consume + ack (prefetch 256)"
        );
        println!(
            "{:<8} {:<8} {:>14} {:>18}",
            "over", "fsync", "enqueues/s", "consume+ack/s"
        );
        let socket =
            std::env::temp_dir().join(format!("courier-bench-q-{}.sock", std::process::id()));
        let unix = format!("unix://{}", socket.display());
        for (over, address) in [("unix", unix.as_str()), ("tcp", "tcp://127.0.0.1:0")] {
            for (name, policy) in [
                ("always", FsyncPolicy::Always),
                ("never", FsyncPolicy::Never),
            ] {
                let _ = std::fs::remove_file(&socket);
                let (enqueue, consume) = runtime.block_on(remote_queue(address, policy, count));
                println!("{over:<8} {name:<8} {enqueue:>14.0} {consume:>18.0}");
                let subject = format!("{over}/{name}");
                report.add(
                    "remote_queue_enqueue",
                    &subject,
                    place,
                    "msgs_per_s",
                    enqueue,
                );
                report.add(
                    "remote_queue_consume_ack",
                    &subject,
                    place,
                    "msgs_per_s",
                    consume,
                );
            }
        }
        let _ = std::fs::remove_file(&socket);
    }
    if selected(&filters, "recovery") {
        let records = mode.pick(1_000_000, 10_000);
        let (took, replayed) = recovery_time(records);
        assert_eq!(replayed, records);
        println!(
            "\nrecovery: {replayed} records of {SIZE} B replayed in {took:.2?} ({:.0} records/s)",
            replayed as f64 / took.as_secs_f64()
        );
        report.add(
            "recovery",
            &format!("{records}"),
            place,
            "seconds",
            took.as_secs_f64(),
        );
    }
    println!("\n{}", report.ratio_table());
    let (tsv, svg) = report.write(&output_dir(mode), "queue_append")?;
    println!("figures: {}\nplot:    {}", tsv.display(), svg.display());
    Ok(())
}
