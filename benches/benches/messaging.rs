//! Message passing one way, 128-byte messages, at-most-once and
//! at-least-once (acknowledged, retransmitted if lost), between two nodes
//! over loopback TCP, beside raw framed TCP streaming in the same run.
//!
//! The sender pipelines with `try_send` (yielding when the peer queue is
//! full); the receiver counts messages in its mailbox and says when it has
//! them all.

use std::time::{Duration, Instant};

use courier_benches::{
    filters, median_and_spread, output_dir, raw, run_pair, selected, Mode, Placement, Report,
};
use courier_messaging::{Delivery, Node, NodeConfig, SendErrorKind};
use courier_transport::Address;

const SIZE: usize = 128;

fn courier(placement: Placement, delivery: Delivery, count: u64) -> Duration {
    let (done_tx, done_rx) = std::sync::mpsc::channel::<Address>();
    run_pair(
        placement,
        move |announce| async move {
            let node = Node::start(NodeConfig::listening("tcp://127.0.0.1:0".parse().unwrap()))
                .await
                .unwrap();
            let mut mailbox = node.mailbox::<Vec<u8>>("bench").unwrap();
            announce.send(node.addresses()[0].clone()).unwrap();
            let reply_to = done_rx.recv().unwrap();
            for _ in 0..count {
                mailbox.recv().await.unwrap();
            }
            let done = node.sender::<u64>(&reply_to, "done", Delivery::AtLeastOnce);
            done.send(count).await.unwrap();
            node.shutdown(Duration::from_secs(1)).await;
        },
        move |address| async move {
            let node = Node::start(NodeConfig::listening("tcp://127.0.0.1:0".parse().unwrap()))
                .await
                .unwrap();
            let mut done = node.mailbox::<u64>("done").unwrap();
            done_tx.send(node.addresses()[0].clone()).unwrap();
            let to = node.sender::<Vec<u8>>(&address, "bench", delivery);
            let body = vec![0xA5u8; SIZE];
            let started = Instant::now();
            for _ in 0..count {
                let mut message = body.clone();
                loop {
                    match to.try_send(message) {
                        Ok(_) => break,
                        Err(err) if err.kind == SendErrorKind::Full => {
                            message = err.into_inner();
                            tokio::task::yield_now().await;
                        }
                        Err(err) => panic!("{err}"),
                    }
                }
            }
            assert_eq!(done.recv().await.unwrap().body, count);
            let took = started.elapsed();
            node.shutdown(Duration::from_secs(1)).await;
            took
        },
    )
}

fn main() -> anyhow::Result<()> {
    let mode = Mode::from_args();
    let repeats = mode.pick(5, 1);
    let count = mode.pick(200_000u64, 2_000);
    let filters = filters();
    let mut report = Report::default();
    println!("messaging benchmarks ({mode:?}): {count} messages of {SIZE} B one way, median of {repeats}\n");
    println!(
        "{:<16} {:<16} {:<6} {:>12} {:>9}",
        "workload", "subject", "place", "msgs/s", "vs raw"
    );
    for placement in Placement::available() {
        if !selected(&filters, "oneway_128B") {
            continue;
        }
        let rate = |took: Duration| count as f64 / took.as_secs_f64();
        let mut raw_rates: Vec<f64> = (0..repeats)
            .map(|_| rate(raw::stream(placement, SIZE, count)))
            .collect();
        let (raw_rate, _) = median_and_spread(&mut raw_rates);
        println!(
            "{:<16} {:<16} {:<6} {:>12.0}",
            "oneway_128B",
            "raw-tcp",
            placement.label(),
            raw_rate
        );
        report.add("oneway_128B", "raw-tcp", placement, "msgs_per_s", raw_rate);
        for (subject, delivery) in [
            ("at-most-once", Delivery::AtMostOnce),
            ("at-least-once", Delivery::AtLeastOnce),
        ] {
            let mut rates: Vec<f64> = (0..repeats)
                .map(|_| rate(courier(placement, delivery, count)))
                .collect();
            let (median, spread) = median_and_spread(&mut rates);
            let ratio = median / raw_rate;
            println!(
                "{:<16} {:<16} {:<6} {:>12.0} {:>8.2}x  (spread {:.0}%)",
                "oneway_128B",
                subject,
                placement.label(),
                median,
                ratio,
                spread * 100.0
            );
            report.add("oneway_128B", subject, placement, "msgs_per_s", median);
            // Issue 3 sets no target for message passing: reported, not judged.
            report.ratio("oneway_128B", subject, placement, ratio, f64::NAN, true);
        }
    }
    println!("\n{}", report.ratio_table());
    let (tsv, svg) = report.write(&output_dir(mode), "messaging")?;
    println!("figures: {}\nplot:    {}", tsv.display(), svg.display());
    Ok(())
}
