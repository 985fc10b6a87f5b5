//! A node's settings.

use std::time::Duration;

use courier_transport::{Address, TransportConfig};

use crate::RetryPolicy;

/// Settings of a node. `Default` suits tests and small deployments.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct NodeConfig {
    /// Addresses to listen on. Empty: the node only sends.
    pub listen: Vec<Address>,
    /// Transport limits and heartbeats for every connection.
    pub transport: TransportConfig,
    /// Messages a mailbox holds before the connection delivering to it waits.
    pub mailbox_capacity: usize,
    /// Sends queued per peer before `send` waits and `try_send` says `Full`.
    pub peer_queue: usize,
    /// Unacknowledged messages per peer.
    pub max_in_flight: usize,
    /// Requests in flight per peer.
    pub max_requests: usize,
    /// Retransmission backoff.
    pub retry: RetryPolicy,
    /// How long an at-least-once send is retried before it fails as expired.
    pub send_timeout: Duration,
    /// De-duplication window per sender stream (sequence numbers).
    pub dedup_window: u64,
    /// Sender streams remembered for de-duplication.
    pub max_streams: usize,
    /// Request handlers running at once per incoming connection.
    pub max_handlers: usize,
    /// First and longest wait between reconnection attempts.
    pub reconnect: (Duration, Duration),
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            listen: Vec::new(),
            transport: TransportConfig::default(),
            mailbox_capacity: 1024,
            peer_queue: 1024,
            max_in_flight: 1024,
            max_requests: 10_000,
            retry: RetryPolicy::default(),
            send_timeout: Duration::from_secs(30),
            dedup_window: 4096,
            max_streams: 1024,
            max_handlers: 256,
            reconnect: (Duration::from_millis(50), Duration::from_secs(5)),
        }
    }
}

impl NodeConfig {
    /// A configuration listening on `address`.
    pub fn listening(address: Address) -> NodeConfig {
        NodeConfig {
            listen: vec![address],
            ..NodeConfig::default()
        }
    }
}
