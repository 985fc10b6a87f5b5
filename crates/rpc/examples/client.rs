//! An RPC client in its own process; start `--example server` first.
//!
//! ```text
//! cargo run -p courier-rpc --example client [ADDRESS]    # default tcp://127.0.0.1:7100
//! ```

#[path = "shared/calculator.rs"]
mod calculator;

use calculator::CalculatorClient;
use courier_rpc::{Client, ClientConfig};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let address = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "tcp://127.0.0.1:7100".into());
    let calculator =
        CalculatorClient::new(Client::connect(&address.parse()?, ClientConfig::default()).await?);
    println!("2 + 3 = {}", calculator.add(2, 3).await?);
    println!("7 / 2 = {:?}", calculator.divide(7, 2).await?);
    println!("1 / 0 = {:?}", calculator.divide(1, 0).await?);
    Ok(())
}
