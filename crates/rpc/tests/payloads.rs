//! `Bytes` payloads decoded from the frame that carried them
//! (`courier_wire::shared`): the right bytes at every size around the
//! sharing thresholds, in arguments, replies and stream items, and on the
//! client a slice of the received frame rather than a copy.

use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use courier_rpc::{Client, ClientConfig, Items, Server, ServerConfig, ServerHandle};
use courier_transport::{bind, Address, TransportConfig};

/// Two payloads side by side in one value.
#[derive(serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Pair {
    #[serde(deserialize_with = "courier_wire::shared::deserialize")]
    pub first: Bytes,
    #[serde(deserialize_with = "courier_wire::shared::deserialize")]
    pub second: Bytes,
}

/// A type of the user's own that happens to be called `Bytes`: an
/// argument of that type is decoded as itself.
mod own {
    #[derive(serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq, Eq)]
    pub struct Bytes(pub Vec<u8>);
}

#[courier_rpc::service]
pub trait Payloads {
    /// Returns both arguments, as received.
    async fn echo(&self, first: ::bytes::Bytes, n: u32, second: bytes::Bytes) -> Pair;
    /// Sends `count` pairs, each a copy of the arguments.
    async fn repeat(
        &self,
        first: bytes::Bytes,
        second: bytes::Bytes,
        count: u32,
        items: Items<Pair>,
    );
    /// Whether the two payloads arrived as slices of the request (they
    /// lie side by side in memory), with `padding` between them and the
    /// rest of the frame.
    async fn shared(&self, first: bytes::Bytes, second: bytes::Bytes, padding: Vec<u8>) -> bool;
    /// The user's own `Bytes`, back.
    async fn own(&self, value: own::Bytes) -> own::Bytes;
}

struct Service;

impl Payloads for Service {
    async fn shared(&self, first: Bytes, second: Bytes, _padding: Vec<u8>) -> bool {
        adjacent(&first, &second)
    }
    async fn own(&self, value: own::Bytes) -> own::Bytes {
        value
    }
    async fn echo(&self, first: Bytes, n: u32, second: Bytes) -> Pair {
        assert_eq!(n, 7, "the argument after a payload decodes too");
        Pair { first, second }
    }
    async fn repeat(&self, first: Bytes, second: Bytes, count: u32, items: Items<Pair>) {
        for _ in 0..count {
            let pair = Pair {
                first: first.clone(),
                second: second.clone(),
            };
            if items.send(pair).await.is_err() {
                return;
            }
        }
    }
}

fn mem() -> Address {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    Address::mem(format!(
        "payloads-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ))
}

/// A server at `address` and a client connected to it.
async fn connected(address: Address) -> (ServerHandle, PayloadsClient) {
    let listener = bind(&address, &TransportConfig::default()).await.unwrap();
    let server = Server::new(ServerConfig::default())
        .service(PayloadsServer::new(Service))
        .spawn(listener);
    let client = Client::connect(server.local_addr(), ClientConfig::default())
        .await
        .unwrap();
    (server, PayloadsClient::new(client))
}

/// A payload of `len` bytes whose content depends on `seed` and position,
/// so an offset or length off by one shows.
fn pattern(len: usize, seed: u8) -> Bytes {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect::<Vec<u8>>()
        .into()
}

/// Whether `second` starts right after `first` and its length prefix in
/// memory: the two are slices of one received frame. Two copies would be
/// separate allocations.
fn adjacent(first: &Bytes, second: &Bytes) -> bool {
    let prefix = match second.len() {
        0..=0x7f => 1,
        0x80..=0x3fff => 2,
        0x4000..=0x1f_ffff => 3,
        _ => 4,
    };
    first.as_ptr() as usize + first.len() + prefix == second.as_ptr() as usize
}

#[tokio::test]
async fn payloads_of_every_size_arrive_whole_and_the_client_shares_its_frames() {
    let sizes = [
        0,
        1,
        127,
        128,
        32 * 1024 - 1,
        32 * 1024,
        40_000,
        70_000,
        300_000,
    ];
    for address in ["tcp://127.0.0.1:0".parse().unwrap(), mem()] {
        let (_server, client) = connected(address).await;
        for (i, &size) in sizes.iter().enumerate() {
            let first = pattern(size, i as u8);
            let second = pattern(size / 2 + 1, 100 + i as u8);
            let echoed = client.echo(first.clone(), 7, second.clone()).await.unwrap();
            assert_eq!(echoed.first, first, "size {size}");
            assert_eq!(echoed.second, second, "size {size}");
            if !first.is_empty() {
                assert!(
                    adjacent(&echoed.first, &echoed.second),
                    "a reply shares its frame"
                );
            }
            let mut items = client
                .repeat(first.clone(), second.clone(), 3)
                .await
                .unwrap();
            for _ in 0..3 {
                let item = items.next().await.unwrap().unwrap();
                assert_eq!(item.first, first, "size {size}");
                assert_eq!(item.second, second, "size {size}");
                if !first.is_empty() {
                    assert!(
                        adjacent(&item.first, &item.second),
                        "an item shares its frame"
                    );
                }
            }
            assert!(items.next().await.is_none());
        }
        let value = own::Bytes(vec![1, 2, 3]);
        assert_eq!(client.own(value.clone()).await.unwrap(), value);
    }
}

/// The server shares only payloads of 32 KiB or more that are at least a
/// quarter of their frame (`Sharing::Large`): a handler that keeps small
/// ones must not pin the read buffers they arrived in.
#[tokio::test]
async fn the_server_shares_only_large_payloads_that_are_much_of_their_frame() {
    for address in ["tcp://127.0.0.1:0".parse().unwrap(), mem()] {
        let (_server, client) = connected(address).await;
        let large = 40 * 1024;
        for (first, second, padding, shared) in [
            (large, large, 0, true),
            (1024, 1024, 0, false),
            (32 * 1024 - 1, 32 * 1024 - 1, 0, false),
            // Each is under a quarter of the frame.
            (large, large, 200 * 1024, false),
        ] {
            let answer = client
                .shared(pattern(first, 1), pattern(second, 2), vec![0; padding])
                .await
                .unwrap();
            assert_eq!(answer, shared, "{first} and {second} B beside {padding} B");
        }
    }
}
