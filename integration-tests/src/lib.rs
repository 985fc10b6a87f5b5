//! A harness for tests that need real processes: start a peer binary, learn
//! the address it bound (it prints it as its first line), and kill it when
//! the test is done or fails.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{bail, Context};
use courier_transport::Address;

/// A child process that is killed (SIGKILL) and reaped when dropped.
#[derive(Debug)]
pub struct Peer {
    child: Child,
    /// The address the peer announced.
    pub address: Address,
}

impl Peer {
    /// Starts `binary` with `args` and waits (at most 30 s) for the first
    /// line of its standard output, which must be the address it serves on.
    pub fn start(binary: &str, args: &[&str]) -> anyhow::Result<Peer> {
        let mut child = Command::new(binary)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("cannot start {binary}"))?;
        let stdout = child.stdout.take().context("no stdout")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let mut peer = Peer {
            child,
            address: Address::mem("unannounced"),
        };
        let line = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(line) if !line.trim().is_empty() => line,
            _ => bail!("{binary} did not announce an address"),
        };
        peer.address = line
            .trim()
            .parse()
            .with_context(|| format!("{binary} announced {line:?}"))?;
        Ok(peer)
    }

    /// `kill -9`, and wait for the process to be gone.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The RPC service the `courier-rpc-peer` process serves.
pub mod rpc_service {
    /// Calls that take as long as asked.
    #[courier_rpc::service]
    pub trait Slow {
        /// Sleeps `ms` milliseconds, then returns it.
        async fn wait(&self, ms: u64) -> u64;
        /// Returns `x` at once.
        async fn echo(&self, x: u64) -> u64;
    }
}
