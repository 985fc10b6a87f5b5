//! An RPC server in its own process.
//!
//! ```text
//! cargo run -p courier-rpc --example server [ADDRESS]    # default tcp://127.0.0.1:7100
//! cargo run -p courier-rpc --example client [ADDRESS]    # in another terminal
//! ```

#[path = "shared/calculator.rs"]
mod calculator;

use calculator::{CalcError, Calculator, CalculatorServer};
use courier_rpc::{Server, ServerConfig};

struct Calc;

impl Calculator for Calc {
    async fn add(&self, a: i64, b: i64) -> i64 {
        a + b
    }

    async fn divide(&self, a: i64, b: i64) -> Result<i64, CalcError> {
        a.checked_div(b).ok_or(CalcError::DivideByZero)
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let address = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "tcp://127.0.0.1:7100".into());
    let listener = courier_transport::bind(&address.parse()?, &Default::default()).await?;
    let server = Server::new(ServerConfig::default())
        .service(CalculatorServer::new(Calc))
        .spawn(listener);
    println!(
        "serving Calculator on {}; Ctrl-C to stop",
        server.local_addr()
    );
    tokio::signal::ctrl_c().await?;
    server.shutdown(std::time::Duration::from_secs(5)).await;
    Ok(())
}
