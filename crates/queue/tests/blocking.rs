//! The blocking face over both queues, from threads without a runtime.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use courier_queue::blocking::BlockingQueue;
use courier_queue::remote::{QueueHost, QueueServiceServer, RemoteQueue};
use courier_queue::{Message, QueueHandle, QueueOptions};
use courier_rpc::{ClientConfig, Server, ServerConfig};
use courier_test_support::TempDir;

static NEXT: AtomicU64 = AtomicU64::new(0);

/// Produce from one thread, consume from two others (competing), answer
/// with ack, nack and reject: every message is acknowledged or
/// dead-lettered exactly as the answers say.
fn program<Q: QueueHandle + Clone + 'static>(queue: BlockingQueue<Q>) {
    let producer = {
        let queue = queue.clone();
        std::thread::spawn(move || {
            for n in 0..20u8 {
                queue.enqueue(Message::new(vec![n])).unwrap();
            }
        })
    };
    producer.join().unwrap();

    // Final answers (ack or reject) so far: the consumers stop at 20.
    let done = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let consumers: Vec<_> = (0..2)
        .map(|_| {
            let (queue, done) = (queue.clone(), done.clone());
            std::thread::spawn(move || {
                let mut consumer = queue.consumer(4).unwrap();
                let mut acked = 0;
                let give_up = std::time::Instant::now() + Duration::from_secs(60);
                while done.load(Ordering::SeqCst) < 20 {
                    assert!(std::time::Instant::now() < give_up, "stuck");
                    let Some(delivery) = consumer.recv_timeout(Duration::from_millis(50)).unwrap()
                    else {
                        continue;
                    };
                    let n = delivery.payload()[0];
                    if n == 7 {
                        delivery.reject().unwrap();
                        done.fetch_add(1, Ordering::SeqCst);
                    } else if n % 5 == 0 && delivery.delivery_count() == 1 {
                        delivery.nack(Duration::ZERO).unwrap();
                    } else {
                        delivery.ack().unwrap();
                        done.fetch_add(1, Ordering::SeqCst);
                        acked += 1;
                    }
                }
                acked
            })
        })
        .collect();
    let acked: u32 = consumers.into_iter().map(|t| t.join().unwrap()).sum();
    assert_eq!(
        acked, 19,
        "every message but the rejected one acknowledged once"
    );
    let stats = queue.stats().unwrap();
    assert_eq!((stats.acknowledged, stats.dead_lettered), (19, 1));
    assert_eq!(stats.redelivered, 4, "messages 0, 5, 10 and 15 came twice");
    let dead = queue.dead_letters().expect("a dead-letter queue");
    assert_eq!(dead.peek(10).unwrap().len(), 1);
}

#[test]
fn the_blocking_face_runs_one_program_on_the_embedded_queue() {
    let dir = TempDir::new("queue-blocking-embedded");
    program(BlockingQueue::open(dir.path(), "jobs", QueueOptions::default()).unwrap());
}

#[test]
fn the_blocking_face_runs_one_program_on_a_remote_queue() {
    let dir = TempDir::new("queue-blocking-remote");
    // The host runs on a runtime of its own, as a broker would.
    let host_runtime = tokio::runtime::Runtime::new().unwrap();
    let address = format!(
        "mem://queue-blocking-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    let server = host_runtime.block_on(async {
        let listener = courier_transport::bind(&address.parse().unwrap(), &Default::default())
            .await
            .unwrap();
        Server::new(ServerConfig::default())
            .service(QueueServiceServer::new(QueueHost::new(
                dir.path(),
                QueueOptions::default(),
            )))
            .spawn(listener)
    });
    // mem:// lives in this process: the client's own runtime reaches it.
    let queue: BlockingQueue<RemoteQueue> =
        BlockingQueue::connect(&address.parse().unwrap(), "jobs", ClientConfig::default()).unwrap();
    program(queue);
    host_runtime.block_on(server.shutdown(Duration::from_secs(1)));
}

#[test]
fn a_wait_that_times_out_loses_no_delivery() {
    let dir = TempDir::new("queue-blocking-timeout");
    let queue = BlockingQueue::open(dir.path(), "jobs", QueueOptions::default()).unwrap();
    let mut consumer = queue.consumer(1).unwrap();
    assert!(consumer
        .recv_timeout(Duration::from_millis(20))
        .unwrap()
        .is_none());
    queue.enqueue(Message::new("late")).unwrap();
    let delivery = consumer
        .recv_timeout(Duration::from_secs(10))
        .unwrap()
        .unwrap();
    assert_eq!(&delivery.payload()[..], b"late");
    delivery.ack().unwrap();
    assert_eq!(queue.stats().unwrap().depth, 0);
}
