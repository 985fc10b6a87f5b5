//! Queue processes for multi-process tests.
//!
//! `courier-queue-peer host DIR`: serves the queues under DIR on a free TCP
//! port and prints the address.
//!
//! `courier-queue-peer consume ADDRESS QUEUE N`: takes N messages without
//! acknowledging them, prints each id, then waits to be killed.

use courier_queue::remote::{QueueHost, QueueServiceServer, RemoteQueue};
use courier_queue::QueueOptions;
use courier_rpc::{ClientConfig, Server, ServerConfig};

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["host", dir] => {
            let listener =
                courier_transport::bind(&"tcp://127.0.0.1:0".parse()?, &Default::default()).await?;
            let server = Server::new(ServerConfig::default())
                .service(QueueServiceServer::new(QueueHost::new(
                    dir,
                    QueueOptions::default(),
                )))
                .spawn(listener);
            println!("{}", server.local_addr());
            std::future::pending::<()>().await;
        }
        ["consume", address, queue, count] => {
            let queue =
                RemoteQueue::connect(&address.parse()?, queue, ClientConfig::default()).await?;
            let count: usize = count.parse()?;
            let mut consumer = queue.consumer(count as u32).await?;
            println!("consuming");
            let mut held = Vec::new();
            for _ in 0..count {
                let delivery = consumer.recv().await?;
                println!("{}", delivery.id);
                held.push(delivery);
            }
            std::future::pending::<()>().await;
        }
        _ => anyhow::bail!("usage: courier-queue-peer host DIR | consume ADDRESS QUEUE N"),
    }
    Ok(())
}
