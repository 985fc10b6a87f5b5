//! Typed messages between two processes.
//!
//! The receiver listens on 127.0.0.1 (a port the system picks) and starts
//! the sender: this same program, run as `sender ADDRESS`. The sender sends
//! orders at-least-once (retried until the receiving node acknowledges
//! each); the receiver answers each one with a confirmation, sent
//! at-least-once the other way; then the sender asks for a summary by
//! request/response. Everything is typed: a receiver of another type would
//! refuse the message by name.
//!
//! ```text
//! cargo run -p courier-messaging --example orders             # both processes
//! cargo run -p courier-messaging --example orders -- receiver  # in one terminal,
//! cargo run -p courier-messaging --example orders -- sender ADDRESS  # and another
//! ```
//!
//! Every wait is bounded: the example fails (exit code 1) rather than hangs.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use courier_messaging::{Delivery, Node, NodeConfig};
use courier_transport::Address;
use serde::{Deserialize, Serialize};

/// How many orders the sender sends.
const ORDERS: u32 = 5;
/// The longest any run of either process may take.
const LIMIT: Duration = Duration::from_secs(30);

#[derive(Serialize, Deserialize, Debug)]
struct Order {
    id: u32,
    item: String,
    quantity: u32,
    /// Where the sender's node listens for confirmations.
    reply_to: String,
}

#[derive(Serialize, Deserialize, Debug)]
struct Confirmation {
    id: u32,
    accepted: bool,
}

#[derive(Serialize, Deserialize, Debug)]
struct SummaryRequest;

#[derive(Serialize, Deserialize, Debug)]
struct Summary {
    orders: u32,
    items: u32,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let run = async {
        match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
            [] => receiver(true).await,
            ["receiver"] => receiver(false).await,
            ["sender", address] => sender(address.parse()?).await,
            _ => bail!("usage: orders [receiver | sender ADDRESS]"),
        }
    };
    tokio::time::timeout(LIMIT, run)
        .await
        .with_context(|| format!("not finished within {LIMIT:?}"))?
}

/// Receives the orders, confirms each, and answers the summary request.
async fn receiver(spawn_sender: bool) -> anyhow::Result<()> {
    let node = Node::start(NodeConfig::listening("tcp://127.0.0.1:0".parse()?)).await?;
    let address = node.addresses()[0].to_string();
    let mut orders = node.mailbox::<Order>("orders")?;
    let (count, items) = (Arc::new(AtomicU32::new(0)), Arc::new(AtomicU32::new(0)));
    let (c, i) = (count.clone(), items.clone());
    node.respond("summary", move |_: SummaryRequest| {
        let summary = Summary {
            orders: c.load(Ordering::SeqCst),
            items: i.load(Ordering::SeqCst),
        };
        async move { summary }
    })?;
    println!("[receiver] node {} listening on {address}", node.id());
    let child = if spawn_sender {
        Some(ChildProcess::spawn(&["sender", &address])?)
    } else {
        println!("[receiver] start the sender: orders sender {address}");
        None
    };

    for _ in 0..ORDERS {
        let envelope = orders.recv().await.context("the mailbox closed")?;
        let order = envelope.body;
        println!(
            "[receiver] order {} from node {}: {} x {}",
            order.id, envelope.from, order.quantity, order.item
        );
        items.fetch_add(order.quantity, Ordering::SeqCst);
        count.fetch_add(1, Ordering::SeqCst);
        let back = node.sender::<Confirmation>(
            &order.reply_to.parse()?,
            "confirmations",
            Delivery::AtLeastOnce,
        );
        back.send(Confirmation {
            id: order.id,
            accepted: true,
        })
        .await
        .map_err(|err| anyhow::anyhow!("confirming order {}: {err}", order.id))?;
    }
    if let Some(child) = child {
        child.wait(LIMIT).await?;
    } else {
        // Alone, give the sender a moment for its summary request.
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let report = node.shutdown(Duration::from_secs(2)).await;
    ensure!(report.unfinished == 0, "{report:?}");
    println!("[receiver] done: {ORDERS} orders received and confirmed");
    Ok(())
}

/// Sends the orders, waits for their confirmations, asks for a summary.
async fn sender(to: Address) -> anyhow::Result<()> {
    let node = Node::start(NodeConfig::listening("tcp://127.0.0.1:0".parse()?)).await?;
    let reply_to = node.addresses()[0].to_string();
    let mut confirmations = node.mailbox::<Confirmation>("confirmations")?;
    println!("[sender] node {} sending to {to}", node.id());
    let orders = node.sender::<Order>(&to, "orders", Delivery::AtLeastOnce);
    for id in 1..=ORDERS {
        let order = Order {
            id,
            item: ["apples", "pears", "plums"][id as usize % 3].into(),
            quantity: id * 2,
            reply_to: reply_to.clone(),
        };
        let progress = orders
            .send(order)
            .await
            .map_err(|err| anyhow::anyhow!("order {id}: {err}"))?;
        println!("[sender] order {id}: {progress:?}");
    }
    for _ in 0..ORDERS {
        let confirmation = confirmations.recv().await.context("the mailbox closed")?;
        println!(
            "[sender] confirmation of order {}: accepted = {}",
            confirmation.body.id, confirmation.body.accepted
        );
    }
    let summary: Summary = node
        .request(&to, "summary", &SummaryRequest, Duration::from_secs(5))
        .await?;
    println!(
        "[sender] summary: {} orders, {} items",
        summary.orders, summary.items
    );
    ensure!(summary.orders == ORDERS, "expected {ORDERS} orders");
    let report = node.shutdown(Duration::from_secs(2)).await;
    ensure!(report.unfinished == 0, "{report:?}");
    Ok(())
}

/// The second process: this program again, killed if it outlives us.
struct ChildProcess(std::process::Child);

impl ChildProcess {
    fn spawn(args: &[&str]) -> anyhow::Result<ChildProcess> {
        let program = std::env::current_exe()?;
        let child = std::process::Command::new(program).args(args).spawn()?;
        Ok(ChildProcess(child))
    }

    /// Waits for it to exit, and fails unless it exits successfully in time.
    async fn wait(mut self, within: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.0.try_wait()? {
                ensure!(status.success(), "the second process failed ({status})");
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "the second process did not finish within {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}
