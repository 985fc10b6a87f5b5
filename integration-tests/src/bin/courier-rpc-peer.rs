//! An RPC server process for multi-process tests: serves the `Slow`
//! service on the address given, printing the bound address first.

use std::time::Duration;

use courier_integration_tests::rpc_service::{Slow, SlowServer};
use courier_rpc::{Server, ServerConfig};

struct Sleeper;

impl Slow for Sleeper {
    async fn wait(&self, ms: u64) -> u64 {
        tokio::time::sleep(Duration::from_millis(ms)).await;
        ms
    }

    async fn echo(&self, x: u64) -> u64 {
        x
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let address = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "tcp://127.0.0.1:0".into());
    let listener = courier_transport::bind(&address.parse()?, &Default::default()).await?;
    let server = Server::new(ServerConfig::default())
        .service(SlowServer::new(Sleeper))
        .spawn(listener);
    println!("{}", server.local_addr());
    std::future::pending::<()>().await;
    Ok(())
}
